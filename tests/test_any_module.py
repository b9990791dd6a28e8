"""Any nn.Module through the bridge: ``lift`` with a rule table written in the test, the parity
checker (``check``), and ``export`` run with JAX alone.

References are independent: eager torch on the same module for outputs and per-module activations,
``generate`` for the exported programs' tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sharding
from bridge import cli
from bridge.check import check_module, format_check, missing_lowerings
from bridge.lift import LiftedModule, lift

RTOL = 1e-5  # fp32, relative to the largest magnitude of each output


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---------------------------------------------------------------------------------------------------
# Modules with their own names and output structures
# ---------------------------------------------------------------------------------------------------
class Mixer(nn.Module):
    """Token mixing then channel mixing; returns a dict."""

    def __init__(self, tokens=16, width=32):
        super().__init__()
        self.token_mix = nn.Linear(tokens, tokens)
        self.channel_up = nn.Linear(width, 4 * width)
        self.mid = nn.GELU()
        self.channel_down = nn.Linear(4 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.token_mix(x.transpose(1, 2)).transpose(1, 2)
        h = self.channel_down(self.mid(self.channel_up(self.norm(x))))
        return {"hidden": x + h, "pooled": (x + h).mean(1)}


class TwoHeads(nn.Module):
    """Returns a tuple."""

    def __init__(self, width=32):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(width, 64), nn.Tanh(), nn.Linear(64, 64))
        self.left, self.right = nn.Linear(64, 8), nn.Linear(64, 24)

    def forward(self, x):
        h = self.trunk(x)
        return self.left(h), torch.softmax(self.right(h), -1)


class Keywords(nn.Module):
    """Keyword tensor inputs (one optional) and a static keyword flag."""

    def __init__(self, width=32):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.gate = nn.Linear(width, width)

    def forward(self, x, *, mask=None, bias=None, double=False):
        y = self.proj(x) * torch.sigmoid(self.gate(x))
        if mask is not None:
            y = y * mask[..., None]
        if bias is not None:
            y = y + bias
        return 2 * y if double else y


TABLE = [
    (r"channel_up\.(weight|bias)$", ("model",)),
    (r"channel_down\.weight$", (None, "model")),
    (r"trunk\.0\.weight$", ("model", None)),
    (r"trunk\.2\.weight$", (None, "model")),
    (r"(proj|gate)\.weight$", ("model", None)),
    (r".*", ()),
]


def custom_scheme():
    return sharding.scheme_from_rows("mine", TABLE, mesh=(("data", 2), ("model", 4)), batch_axes=("data",))


def one_device():
    return sharding.make_mesh({"data": 1, "model": 1}, jax.devices()[:1])


def cases():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 32)
    return [
        ("dict", Mixer(), (x,), {}),
        ("tuple", TwoHeads(), (torch.randn(4, 32),), {}),
        ("keywords", Keywords(), (x,), {"mask": (torch.rand(4, 16) > 0.3).float(), "bias": torch.randn(32), "double": True}),
    ]


def leaves(out):
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("name,model,args,kwargs", cases(), ids=[c[0] for c in cases()])
def test_lifted_outputs_equal_eager_on_1_and_8_devices(name, model, args, kwargs, devices):
    with torch.no_grad():
        want = model(*args, **kwargs)
    for mesh in (one_device(), sharding.make_mesh({"data": 2, "model": 4}, devices)):
        lifted = lift(model, mesh, custom_scheme())
        assert type(lifted) is LiftedModule
        got = lifted(*args, **kwargs)
        if isinstance(want, torch.Tensor):
            assert isinstance(got, jax.Array)
        else:  # the module's own container: a dict with the same keys, a tuple
            assert type(got) is type(want) and (not isinstance(want, dict) or set(got) == set(want))
        for g, w in zip(leaves(got), leaves(want)):
            assert g.shape == tuple(w.shape)
            assert rel(g, w.numpy()) < RTOL, name
    # The report shows the custom table's placements on the 8-device mesh.
    rows = {r["name"]: r["spec"] for r in lifted.report()["rows"]}
    expected = {
        "dict": {"channel_up.weight": "P('model',)", "channel_down.weight": "P(None, 'model')", "token_mix.weight": "P()"},
        "tuple": {"trunk.0.weight": "P('model', None)", "trunk.2.weight": "P(None, 'model')", "left.weight": "P()"},
        "keywords": {"proj.weight": "P('model', None)", "gate.weight": "P('model', None)", "proj.bias": "P()"},
    }[name]
    assert {k: rows[k] for k in expected} == expected
    assert lifted.weights[next(iter(expected))].sharding.spec == sharding.P(*eval(expected[next(iter(expected))][1:]))


def transformers_encoders():
    import transformers as T

    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=37)).eval()  # fmt: skip
    clip = T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=32, patch_size=8)).eval()  # fmt: skip
    t5 = T.T5EncoderModel(T.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval()
    # transformers' ResNet and ViT stand in for timm's: timm needs torchvision, which has no CPU wheel
    # for torch 2.13 here (the one on the index links libtorch_cuda).
    resnet = T.ResNetModel(T.ResNetConfig(layer_type="basic", depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8)).eval()
    with torch.no_grad():  # running statistics that are not the identity
        for m in resnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
    vit = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                 image_size=32, patch_size=8)).eval()  # fmt: skip
    return [("bert", bert, (torch.randint(0, 99, (8, 12)),)), ("clip-vision", clip, (torch.randn(8, 3, 32, 32),)),
            ("t5-encoder", t5, (torch.randint(0, 99, (8, 12)),)), ("resnet", resnet, (torch.randn(8, 3, 32, 32),)),
            ("vit", vit, (torch.randn(8, 3, 32, 32),))]  # fmt: skip


ENCODERS = ["bert", "clip-vision", "t5-encoder", "resnet", "vit"]


@pytest.mark.parametrize("name,model,args", transformers_encoders(), ids=ENCODERS)
def test_transformers_model_outputs_come_back_as_themselves(name, model, args, devices):
    """Called as users call them (``return_dict`` on), transformers models return a ``ModelOutput``,
    which JAX does not know as a pytree: the lifted forward returns the same class with the same
    fields (issue 32), at 1e-5 of eager torch on 1 and 8 devices (dp)."""
    with torch.no_grad():
        want = model(*args)
    for n in (1, 8):
        got = lift(model, sharding.mesh_for("dp", n, devices=devices), "dp")(*args)
        assert type(got) is type(want) and list(got.keys()) == list(want.keys())
        for k in want.keys():
            assert rel(got[k], want[k].numpy()) < RTOL, (name, n, k)
    # check agrees, module by module, on 1 device and dp over 8
    report = check_module(model, args, mesh=sharding.mesh_for("dp", 8, devices=devices), scheme="dp")
    assert report.ok and len(report.rows) > 5, format_check(report)


def padded_encoder():
    """``nn.TransformerEncoder`` with torch's defaults (nested tensors on) and a padding mask whose
    rows end in padding: eager torch in eval mode takes its fused path and returns zeros at the
    padded positions (before the final norm)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32)).eval()
    x = torch.randn(8, 7, 32)
    pad = torch.zeros(8, 7, dtype=torch.bool)
    pad[0, 5:] = pad[3, 2:] = pad[6, 6:] = True
    return model, x, pad


def test_transformer_encoder_with_a_padding_mask_equals_eager_torch(devices):
    """Issue 32, item 3: the lifted encoder returns what eager torch returns, padded rows included,
    on 1 and 8 devices, and ``check`` compares against eager torch as the user's torch runs it."""
    model, x, pad = padded_encoder()
    assert torch.backends.mha.get_fastpath_enabled()  # the bridge (imported here) left torch's default
    with torch.no_grad():
        want = model(x, src_key_padding_mask=pad)
    assert float(want[0, 5:].std()) < 1e-6  # eager's fused path: the padded rows are the norm of zeros
    for n in (1, 8):
        got = lift(model, sharding.mesh_for("dp", n, devices=devices), "dp")(x, src_key_padding_mask=pad)
        assert rel(got, want.numpy()) < RTOL, n
    report = check_module(model, (x,), {"src_key_padding_mask": pad}, mesh=one_device(), scheme="dp")
    assert report.ok, format_check(report)
    # A mask with padding inside a row: torch's unfused path, and the lifted one agrees with it too.
    pad[1, 2] = True
    with torch.no_grad():
        want = model(x, src_key_padding_mask=pad)
    assert rel(lift(model, one_device(), "dp")(x, src_key_padding_mask=pad), want.numpy()) < RTOL


def test_importing_the_bridge_leaves_eager_torch_as_it_was():
    """torchax switches torch's attention fast path off at import; the bridge restores it (and turns
    it off only around its own tracing), so eager torch returns the same before and after."""
    code = """
import torch
from tests.test_any_module import padded_encoder
model, x, pad = padded_encoder()
with torch.no_grad():
    before = model(x, src_key_padding_mask=pad)
from bridge.lift import lift
import sharding
lifted = lift(model, sharding.mesh_for("dp", 1), "dp")
with torch.no_grad():
    after = model(x, src_key_padding_mask=pad)
print(torch.backends.mha.get_fastpath_enabled(), torch.equal(before, after))
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["True", "True"]


@pytest.mark.parametrize("n", [1, 8])
def test_a_module_in_train_mode_runs_as_torch_trains_it(n, devices):
    """Issue 32, item 4: the module's mode is part of the program's key. In train mode BatchNorm
    normalises by the batch and updates its running statistics and counter in the lifted weights as
    torch does in the module; back in eval mode, the same lifted module uses them; ``to_torch``
    writes them into the module."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).train()
    reference = copy.deepcopy(model)
    lifted = lift(model, sharding.mesh_for("dp", n, devices=devices), "dp")
    for _ in range(3):
        x = torch.randn(8, 3, 8, 8)
        with torch.no_grad():
            want = reference(x)
        assert rel(lifted(x), want.numpy()) < RTOL
    for name, buffer in reference.named_buffers():
        assert np.abs(np.asarray(lifted.weights[name]) - buffer.numpy()).max() <= 1e-6 * max(1.0, buffer.abs().max()), name
    assert int(lifted.weights["1.num_batches_tracked"]) == 3
    model.eval(), reference.eval()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        assert rel(lifted(x), reference(x).numpy()) < RTOL  # eval: the running statistics
    assert model[1].num_batches_tracked == 0  # the module itself is untouched until written back
    lifted.to_torch()
    assert model[1].num_batches_tracked == 3
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, rtol=1e-6, atol=1e-7)


class Block(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x, scale):
        return x + scale * self.down(F.gelu(self.up(self.norm(x))))


class Tower(nn.Module):
    """A user's stack of identical blocks, called as a chain with a shared extra argument."""

    def __init__(self, depth=6, residual_outside=False):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(32, 8)
        self.residual_outside = residual_outside

    def forward(self, x, scale):
        hidden = []
        for block in self.blocks:
            x = block(x, scale) + x if self.residual_outside else block(x, scale)
            hidden.append(x)
        return self.head(x), torch.stack(hidden)  # every block's output too


def test_any_modules_stack_of_identical_layers_runs_as_one_scan(devices):
    """Issue 31: a user's ``ModuleList`` of identical blocks is found, its weights stacked, and one
    block's forward is the body of a scan (every block's own output still comes back, for the
    module's own use and for check); outputs equal eager torch on 1 and 8 devices; a loop that is
    not a plain chain runs unrolled on the same stacked weights, saying why."""
    torch.manual_seed(0)
    model, x, scale = Tower().eval(), torch.randn(8, 5, 32), torch.tensor(0.5)
    with torch.no_grad():
        want = model(x, scale)
    for n in (1, 8):
        lifted = lift(model, sharding.mesh_for("dp", n, devices=devices), "dp")
        assert lifted.plan.scan_layers and "blocks.*.up.weight" in lifted.weights
        got = lifted(x, scale)
        assert rel(got[0], want[0].numpy()) < RTOL and rel(got[1], want[1].numpy()) < RTOL
    call, arrays = lifted.jitted((x, scale), {})
    text = call.lower(lifted.weights, arrays).as_text()
    assert "while" in text and text.count("dot_general") <= 4  # one block's two products (+ the head)
    unrolled = lift(model, one_device(), "dp", scan_layers=False)
    assert not unrolled.plan.scan_layers and rel(unrolled(x, scale)[0], want[0].numpy()) < RTOL
    assert check_module(model, (x, scale), mesh=sharding.mesh_for("dp", 8, devices=devices), scheme="dp").ok
    # x = block(x) + x: not a chain of the blocks' own outputs. Unrolled, the same answer.
    other = Tower(residual_outside=True).eval()
    with torch.no_grad():
        want = other(x, scale)
    lifted = lift(other, one_device(), "dp")
    assert rel(lifted(x, scale)[0], want[0].numpy()) < RTOL
    assert "used before the last layer ran" in lifted.fn.why
    before = other.blocks[3].up.weight.detach().clone()
    lifted.weights["blocks.*.up.weight"] = lifted.weights["blocks.*.up.weight"] * 2
    lifted.to_torch()  # the stacked weights go back into each block
    torch.testing.assert_close(other.blocks[3].up.weight.detach(), 2 * before)


def test_layers_that_differ_only_in_settings_are_not_one_stack():
    """ResNet's block: two conv layers with the same tensors, only the first applies its ReLU."""
    import transformers as T

    from bridge import scan

    resnet = T.ResNetModel(T.ResNetConfig(layer_type="basic", depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8))
    assert scan.identical_stack(resnet) == ""
    assert "no ModuleList or Sequential" in scan.why_not_scanned(resnet)
    assert scan.identical_stack(Tower()) == "blocks"
    block = Block()  # one module called three times (ALBERT's sharing): no stack of its own tensors
    shared = Tower()
    shared.blocks = nn.ModuleList([block, block, block])
    assert scan.identical_stack(shared) == ""


def test_inputs_batch_sharded_and_one_compile_per_shape(devices):
    model = Mixer().eval()
    lifted = lift(model, sharding.make_mesh({"data": 2, "model": 4}, devices), custom_scheme())
    x = torch.randn(4, 16, 32)
    out = lifted(x)
    assert out["hidden"].sharding.spec[0] == "data"  # the batch stayed on the data axis
    call, _ = lifted.jitted((x,), {})
    lifted(x + 1)
    assert call._cache_size() == 1  # same shape: no second compile
    lifted(torch.randn(2, 16, 32))
    assert call._cache_size() == 2  # a new shape: one more
    # A list of rows is a table too (no batch axes: inputs replicated).
    lifted_rows = lift(model, sharding.make_mesh({"model": 8}, devices), TABLE[:2] + [(r".*", ())])
    assert lifted_rows.placements["channel_up.weight"].spec == sharding.P("model")
    assert rel(lifted_rows(x)["pooled"], model(x)["pooled"].detach().numpy()) < RTOL


# ---------------------------------------------------------------------------------------------------
# The parity checker
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def wrong_gelu():
    """A deliberately wrong lowering of F.gelu (tanh in place of GELU), installed in torchax's
    environment for the test and removed after."""
    from bridge.torchax_compat import import_torchax

    env = import_torchax().default_env()
    before = env._ops.get(F.gelu)
    env.override_op_definition(F.gelu, lambda x, approximate="none": torch.tanh(x))
    yield
    if before is None:
        env._ops.pop(F.gelu)
    else:
        env._ops[F.gelu] = before


def test_check_is_not_fooled_by_in_place_ops(devices):
    """ResNet's pattern: a BatchNorm whose output the next ``ReLU(inplace=True)`` overwrites. The
    eager capture is a copy, so check passes where the outputs agree (it reported the BatchNorm at
    relative error ~1 while it kept a view)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    report = check_module(model, (torch.randn(2, 3, 8, 8),), mesh=one_device(), scheme=custom_scheme())
    assert report.ok, format_check(report)
    assert any(r.module == "1" for r in report.rows)  # the BatchNorm was compared


def test_check_names_the_module_with_a_wrong_lowering(wrong_gelu, devices):
    model = Mixer()
    report = check_module(model, (torch.randn(4, 16, 32),), mesh=sharding.make_mesh({"data": 2, "model": 4}, devices),
                          scheme=custom_scheme())  # fmt: skip
    assert not report.ok
    module, run, err = report.first_divergence
    assert module == "mid" and err > 1e-2
    # Every module before it agrees.
    names = [r.module for r in report.rows]
    for row in report.rows[: names.index("mid")]:
        assert all(e is not None and e < 1e-4 for e in row.errors.values()), row
    assert "first divergence at mid" in format_check(report)


def test_check_passes_without_the_wrong_lowering(devices):
    report = check_module(Mixer(), (torch.randn(4, 16, 32),), mesh=sharding.make_mesh({"data": 2, "model": 4}, devices),
                          scheme=custom_scheme())  # fmt: skip
    assert report.ok, format_check(report)
    assert [r.module for r in report.rows][:3] == ["token_mix", "norm", "channel_up"]


class Special(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = torch.special.airy_ai(self.lin(x))
        return torch.special.scaled_modified_bessel_k0(y.abs() + 1) + y


class Positives(nn.Module):
    def forward(self, x):
        return x[x > 0]  # a data-dependent shape: no static program can hold it


class WithADataDependentShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.inner, self.out = nn.Linear(4, 4), Positives(), nn.Linear(1, 1)

    def forward(self, x):
        return self.inner(self.lin(x)).sum()


def test_a_tracing_failure_names_the_module_and_the_op():
    found = missing_lowerings(WithADataDependentShape(), (torch.randn(2, 4),))
    assert found["missing"] == [] and found["stopped"].startswith("in inner (Positives), in the lowering of torch.Tensor.__getitem__: NonConcreteBooleanIndexError"), found
    report = check_module(WithADataDependentShape(), (torch.randn(2, 4),))
    assert not report.ok and "in inner (Positives)" in format_check(report)


def test_missing_lowerings_are_listed_all_at_once():
    found = missing_lowerings(Special(), (torch.randn(2, 4),))
    assert found == {"missing": ["aten::special_airy_ai", "aten::special_scaled_modified_bessel_k0"], "stopped": None}
    report = check_module(Special(), (torch.randn(2, 4),))
    assert not report.ok and report.missing == found["missing"]
    assert "aten::special_airy_ai, aten::special_scaled_modified_bessel_k0" in format_check(report)
    assert missing_lowerings(Mixer(), (torch.randn(2, 16, 32),)) == {"missing": [], "stopped": None}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-neox", "tiny-mixtral", "tiny-grok"])
def test_check_every_builtin_family_under_tp_and_fsdp(preset, devices):
    import model_torch

    torch.manual_seed(0)
    model = model_torch.from_preset(preset)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    for scheme in ("tp", "fsdp"):
        report = check_module(model, (ids,), mesh=sharding.mesh_for(scheme, 8, devices=devices), scheme=scheme)
        assert report.ok, (preset, scheme, format_check(report))
        assert len(report.rows) > 10 and all(e is not None for r in report.rows for e in r.errors.values())


@pytest.mark.parametrize("preset,scheme", [("tiny-llama", "tp"), ("tiny-neox", "fsdp"), ("tiny-mixtral", "fsdp"),
                                            ("tiny-grok", "tp")])  # fmt: skip
def test_check_scanned_stack_compares_every_layer(preset, scheme, devices):
    # The scan body runs layer 0's modules once; every layer's outputs still come out (stacked per
    # iteration) and each is compared with its own eager layer: a copy of layer 0's values under
    # layer 1's name would diverge.
    import model_torch

    torch.manual_seed(0)
    model = model_torch.from_preset(preset)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    mesh = sharding.mesh_for(scheme, 8, devices=devices)
    unrolled = check_module(model, (ids,), mesh=mesh, scheme=scheme)
    scanned = check_module(model, (ids,), mesh=mesh, scheme=scheme, scan_layers=True)
    assert scanned.ok, format_check(scanned)
    assert [r.module for r in scanned.rows] == [r.module for r in unrolled.rows]
    layers = {r.module.split(".")[2] for r in scanned.rows if ".layers." in r.module}
    assert layers == {str(i) for i in range(model.config.num_layers)}
    assert all(e is not None for r in scanned.rows for e in r.errors.values())
    assert scanned.runs == ["1 device, scanned", f"{scheme} on 8, scanned"]


def test_check_command(devices, capfd):
    assert cli.main(["check", "--checkpoint", "tiny-llama", "--devices", "8", "--scheme", "tp"]) == 0
    out = capfd.readouterr().out
    assert "aten ops torchax cannot lower: none" in out and "OK: every module" in out
    assert "model.layers.1.mlp.down_proj" in out and "tp on 8" in out
    assert cli.main(["check", "--checkpoint", "tiny-llama", "--devices", "2", "--scheme", "fsdp", "--json",
                     "--input-ids", "1,2,3,4"]) == 0  # fmt: skip
    result = json.loads(capfd.readouterr().out)
    assert result["ok"] and result["first_divergence"] is None and result["modules"]


def test_check_command_exits_1_on_divergence(wrong_gelu, devices, capfd):
    # tiny-neox's MLP uses GELU: the wrong lowering is named where it first acts.
    assert cli.main(["check", "--checkpoint", "tiny-neox", "--devices", "2", "--scheme", "tp"]) == 1
    out = capfd.readouterr().out
    assert "FAIL: first divergence at gpt_neox.layers.0.mlp" in out
    # Scanned: named at the same module, and the later layers' rows are there too.
    assert cli.main(["check", "--checkpoint", "tiny-neox", "--devices", "2", "--scheme", "tp", "--scan-layers"]) == 1
    out = capfd.readouterr().out
    assert "FAIL: first divergence at gpt_neox.layers.0.mlp" in out and "gpt_neox.layers.1.mlp " in out


# ---------------------------------------------------------------------------------------------------
# Export, run with JAX alone
# ---------------------------------------------------------------------------------------------------
BLOCK_TORCH = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchax", "transformers"):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Block())
try:
    import torch
    raise SystemExit("torch imported")
except ImportError:
    pass
sys.argv = ["bridge.exported", *sys.argv[1:]]
runpy.run_module("bridge.exported", run_name="__main__")
"""


def run_without_torch(args, devices: int) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=Path(__file__).parent.parent)  # fmt: skip


def test_exported_module_runs_like_the_lifted_one(tmp_path, devices):
    from bridge import exported
    from bridge.export import export_module

    model = Keywords()
    x, mask = torch.randn(4, 16, 32), torch.ones(4, 16)
    lifted = lift(model, sharding.make_mesh({"data": 2, "model": 4}, devices), custom_scheme())
    out = export_module(lifted, (x,), {"mask": mask, "double": True}, tmp_path / "exp")
    loaded = exported.load(out)
    got = loaded(x.numpy(), mask.numpy())
    assert rel(got, model(x, mask=mask, double=True).detach().numpy()) < RTOL
    assert got.sharding.spec[0] == "data"  # still sharded as exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mesh"] == {"data": 2, "model": 4} and manifest["weights"]["proj.weight"] == ["model", None]


def test_an_exported_transformers_model_returns_its_model_output(tmp_path, devices):
    """The ModelOutput survives export: as itself where transformers imports, as the dict of its
    fields in a runner without torch."""
    from bridge import exported
    from bridge.export import export_module

    name, bert, (ids,) = transformers_encoders()[0]
    out = export_module(lift(bert, sharding.mesh_for("dp", 2, devices=devices), "dp"), (ids,), out=tmp_path / "bert")
    with torch.no_grad():
        want = bert(ids)
    got = exported.load(out)(ids.numpy().astype(np.int32))
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    assert rel(got.pooler_output, want.pooler_output.numpy()) < RTOL
    np.save(tmp_path / "ids.npy", ids.numpy().astype(np.int32))
    code = (f"from bridge import exported; import numpy as np; out = exported.load({str(out)!r})"
            f"(np.load({str(tmp_path / 'ids.npy')!r})); print(type(out).__name__, sorted(out))")  # fmt: skip
    import os

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH.split("sys.argv =")[0] + code], capture_output=True,
                          text=True, env=env, timeout=300, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["dict", "['last_hidden_state',", "'pooler_output']"]


@pytest.mark.slow
def test_exported_smollm2_greedy_equals_generate_without_torch(tmp_path, devices, capfd):
    """SmolLM2 exported tensor-parallel on 2 devices; a process where importing torch fails decodes
    the same 16 greedy tokens as ``generate``."""
    prompt = "1,504,3458,282,4649,314,4649,30"
    out = tmp_path / "smollm2"
    argv = ["--checkpoint", "smollm2", "--devices", "2", "--scheme", "tp", "--fallback", "replicate"]
    assert cli.main(["export", *argv, "--out", str(out), "--prompt-len", "16", "--max-new-tokens", "16"]) == 0
    assert cli.main(["generate", *argv, "--input-ids", prompt, "--max-new-tokens", "16", "--json"]) == 0
    want = json.loads(capfd.readouterr().out.strip().splitlines()[-1])["token_ids"]
    proc = run_without_torch([str(out), "--input-ids", prompt, "--max-new-tokens", "16"], devices=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"]
    assert got == want and len(got) >= 1
    from bridge import exported  # ids outside the vocabulary: one line, exit 2

    assert exported.main([str(out), "--input-ids", "1,49152"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[0, 49152)" in err[0] and "49152" in err[0], err
    assert {p.name for p in out.iterdir()} == {"manifest.json", "weights.safetensors", "forward.jaxexport",
                                                 "prefill.jaxexport", "decode_step.jaxexport"}  # fmt: skip
