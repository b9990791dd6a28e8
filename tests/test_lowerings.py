"""Our F.linear lowering (bridge/lowerings.py): same numbers as torch, and for one token it compiles to
a fused matrix-vector loop that reads a materialised input (the reason it exists)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bridge import lowerings
from bridge.extract import torchax_with_lowerings
from conftest import RTOL, max_rel


@pytest.mark.parametrize("shape", [(1, 1, 96), (1, 96), (3, 5, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_torch(shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=g), torch.randn(48, 96, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    ours = lowerings.linear(jnp.asarray(x.numpy()), jnp.asarray(w.numpy()), None if b is None else jnp.asarray(b.numpy()))
    assert ours.shape == shape[:-1] + (48,)
    assert max_rel(ours, F.linear(x, w, b).numpy()) < RTOL


def test_installed_once_in_the_default_env_and_used_by_lifted_modules():
    tx = torchax_with_lowerings()
    env = tx.default_env()
    op = env._ops[F.linear]  # the torchax registry entry our install() wrote
    lowerings.install(env)  # idempotent: the same entry stays
    assert env._ops[F.linear] is op and op.is_user_defined
    lin = torch.nn.Linear(96, 48).eval()
    weights, fn = tx.extract_jax(lin)
    x = torch.randn(1, 1, 96)
    hlo = jax.jit(fn).lower(weights, (jnp.asarray(x.numpy()),)).as_text()
    assert "...a,ba->...b" not in hlo  # torchax's own einsum lowering is not the one traced
    with torch.no_grad():
        assert max_rel(fn(weights, (jnp.asarray(x.numpy()),)), lin(x).numpy()) < RTOL


def _compiled(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def _dot_loop(text: str) -> str:
    """The body of the fused computation that holds the matrix-vector dot; fails if the dot is a
    standalone (library) call instead."""
    entry = text.split("ENTRY")[1]
    assert not re.search(r"= f32\S* dot\(", entry), "the matrix-vector product was not fused"
    bodies = re.findall(r"\n(%fused_computation[^\n]*\{\n.*?\n\})", text, re.S)
    with_dot = [b for b in bodies if re.search(r"= f32\[1536\]\{0\} dot\(", b)]
    assert len(with_dot) == 1
    return with_dot[0]


def test_one_token_linear_is_a_fused_loop_that_reads_a_materialised_input():
    x, w = jnp.ones((1, 1, 576)), jnp.ones((1536, 576))
    scale = jnp.full((576,), 2.0)
    # The input is a cheap elementwise product (as an RMSNorm scale is). Written plainly, XLA fuses
    # it into the matrix-vector loop, which then recomputes it for every output row...
    plain = _dot_loop(_compiled(lambda x, s, w: (x * s) @ w.T, x, scale, w))
    assert "multiply(" in plain
    # ... our lowering keeps the loop to the product itself.
    ours = _dot_loop(_compiled(lambda x, s, w: lowerings.linear(x * s, w), x, scale, w))
    assert "multiply(" not in ours
    y = jax.jit(lambda x, s, w: lowerings.linear(x * s, w))(x, scale, w)
    np.testing.assert_array_equal(np.asarray(y), np.full((1, 1, 1536), 1152.0, np.float32))


def test_einsum_lowering_is_a_library_call_for_one_token():
    """Why we replace torchax's einsum lowering: XLA:CPU sends it to a (single-threaded) library
    matrix-vector call instead of the fused loop above."""
    x, w = jnp.ones((1, 1, 576)), jnp.ones((1536, 576))
    text = _compiled(lambda x, w: jnp.einsum("...a,ba->...b", x, w), x, w)
    assert re.search(r"= f32\[1,1536\]\S* dot\(", text.split("ENTRY")[1])


@pytest.mark.parametrize("shape", [(1, 1, 576), (4, 7, 576)])
def test_bf16_linear_accumulates_in_fp32(shape):
    """bf16 weights: the product accumulates in fp32 and rounds once (XLA:CPU otherwise converts
    every bf16 weight to an fp32 copy per decode step: SmolLM2 bf16 decode went from 4.9 to ~60
    tokens/s). Equal to the fp32 product of the same bf16 values, rounded to bf16."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=g).bfloat16(), torch.randn(384, 576, generator=g).bfloat16()
    ours = lowerings.linear(jnp.asarray(x.float().numpy(), jnp.bfloat16), jnp.asarray(w.float().numpy(), jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16
    ref = F.linear(x.float(), w.float())  # exact products, fp32 sums
    assert max_rel(np.asarray(ours, np.float32), ref.numpy()) < 2**-8  # one bf16 rounding


# ---------------------------------------------------------------------------------------------------
# Ops torchax lowers wrongly (issue 32, item 6): ours, against eager torch
# ---------------------------------------------------------------------------------------------------
def _lifted_equals_eager(module, *args, rtol=1e-5):
    import sharding
    from bridge.lift import lift

    module = module.eval()
    with torch.no_grad():
        want = module(*args)
    got = lift(module, sharding.mesh_for("dp", 1), "dp")(*args)
    err = float(np.abs(np.asarray(got) - want.numpy()).max() / np.abs(want.numpy()).max())
    assert err < rtol, err


class Bags(torch.nn.Module):
    def __init__(self, mode, padding_idx=None):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(50, 16, mode=mode, padding_idx=padding_idx)

    def forward(self, ids, offsets=None, weights=None):
        return self.bag(ids, offsets, per_sample_weights=weights)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_with_offsets_and_as_rows(mode):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (20,))
    ids[3] = ids[11] = 0  # the padding index
    offsets = torch.tensor([0, 4, 4, 9, 15])  # bag 1 is empty
    _lifted_equals_eager(Bags(mode), ids, offsets)
    _lifted_equals_eager(Bags(mode, padding_idx=0), ids, offsets)
    _lifted_equals_eager(Bags(mode), torch.randint(0, 50, (6, 5)))  # 2-d input: one bag per row
    if mode == "sum":
        _lifted_equals_eager(Bags(mode), ids, offsets, torch.rand(20))


class Resize(torch.nn.Module):
    def __init__(self, mode, **kw):
        super().__init__()
        self.mode, self.kw = mode, kw

    def forward(self, x):
        return torch.nn.functional.interpolate(x, mode=self.mode, antialias=True, **self.kw)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("kw", [dict(size=(7, 5)), dict(size=(40, 33)), dict(scale_factor=0.5),
                                dict(size=(9, 6), align_corners=True)], ids=["down", "up", "scale", "corners"])  # fmt: skip
def test_antialiased_interpolate(mode, kw):
    torch.manual_seed(0)
    _lifted_equals_eager(Resize(mode, **kw), torch.randn(2, 3, 24, 17))


class Solve(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, a, b):
        return torch.linalg.solve_triangular(a, b, **self.kw)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("unit", [False, True], ids=["diag", "unit"])
def test_solve_triangular_is_xla_ops_that_run_on_a_mesh(upper, left, unit):
    """A triangular solve equals torch's, and compiles to XLA ops, not LAPACK's ``trsm``: a program
    holding that custom call on 2 CPU devices never finished (Qwen3-Next's prefill)."""
    import sharding
    from bridge.lift import lift

    torch.manual_seed(0)
    a = torch.randn(2, 3, 16, 16) / 4 + 2 * torch.eye(16)  # well conditioned
    b = torch.randn(2, 3, 16, 5) if left else torch.randn(2, 3, 5, 16)
    module = Solve(upper=upper, left=left, unitriangular=unit)
    want = module(a, b).numpy()
    lifted = lift(module, sharding.mesh_for("dp", 2), "dp")
    program = jax.jit(lambda a, b: lifted.fn(lifted.weights, (a, b), {}))
    assert "lapack" not in program.lower(a.numpy(), b.numpy()).compile().as_text()  # checked before running it
    assert max_rel(lifted(a, b), want) < RTOL
