"""The CPU small-batch kernel (bridge/cpu_kernels.py) against numpy and HF, where it applies and where
it must not, and the KV-cache write ordered after the attention (no per-step cache copies)."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import sharding
from bridge import checkpoints, cpu_kernels
from conftest import needs_compiler
from bridge.generate import Generator
from bridge.lift import lift
from tests.test_generate import hf_twin

RTOL = 1e-5  # fp32 accumulation in another order than numpy's float64 reference


NO_COMPILER = cpu_kernels._compiler() is None
HAS_BF16_PAIRS = "avx512_bf16" in cpu_kernels._cpu_flags()


@pytest.fixture(params=[pytest.param(v, marks=needs_compiler) for v in cpu_kernels.runnable_variants()])
def kernel(request, monkeypatch):
    """Each build of the kernel this machine executes (``native``, and ``avx2`` on an AVX-512 CPU),
    selected for the test (switched on for it, whatever ``TORCHAX_BRIDGE_CPU_KERNELS`` says outside);
    skipped with the reason only where no compiler can build it. With a compiler and a build this CPU
    runs, a build that fails is a failure."""
    monkeypatch.delenv(cpu_kernels.SWITCH, raising=False)
    with cpu_kernels.using(request.param):
        why = cpu_kernels.why_unavailable()
        if why is not None:
            pytest.fail(f"build {request.param} of the kernel failed with a compiler present: {why}")
        yield request.param


def test_every_build_names_its_isa(kernel):
    """The build says what it was compiled for; ``avx2`` never carries AVX-512 instructions."""
    isa = cpu_kernels.isa()
    assert isa in ("AVX-512+BF16", "AVX-512", "AVX2+FMA", "AVX", "NEON", "SSE2", "generic"), isa
    if kernel == "avx2" or "avx512f" not in cpu_kernels._cpu_flags():
        assert not isa.startswith("AVX-512") and not cpu_kernels.bf16_pairs()
    elif HAS_BF16_PAIRS:  # the native build on an AVX512-BF16 CPU multiplies bf16 pairs
        assert isa == "AVX-512+BF16" and cpu_kernels.bf16_pairs()


def reference(x, w, dtype):
    """float64 numpy product of what the kernel is given (bf16/int8 weights exactly widened)."""
    return np.asarray(x, np.float64) @ np.asarray(w.astype(np.float32), np.float64).T


def weights(rng, shape, dtype):
    if dtype == "int8":
        return rng.integers(-127, 128, shape).astype(np.int8)
    w = rng.standard_normal(shape).astype(np.float32)
    return w.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else w


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("m,n,k", [(2, 130, 576), (8, 5, 37), (9, 64, 16), (16, 1, 100), (3, 67, 1)])
def test_kernel_equals_numpy(kernel, dtype, m, n, k):
    """Rows padded to the register block, weight rows not a multiple of the row block, K with a
    masked tail; every weight dtype it reads."""
    rng = np.random.default_rng(m * 1000 + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = weights(rng, (n, k), dtype)
    got = jax.jit(cpu_kernels.small_batch_matmul)(jnp.asarray(x), jnp.asarray(w))
    want = reference(x, w, dtype)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    assert np.abs(np.asarray(got, np.float64) - want).max() <= RTOL * np.abs(want).max()


@pytest.mark.parametrize("m,n,k", [(2, 130, 576), (8, 5, 37), (9, 64, 16), (16, 1, 100), (3, 67, 1), (8, 33, 1536)])
def test_bf16_rows_times_bf16_weights(kernel, m, n, k):
    """bf16 rows with bf16 weights enter the kernel as bf16 in every build, no f32 copy of the rows
    made: on a build with AVX512-BF16 as dot products of pairs (f32 sums; K tails past a multiple of
    32 masked), elsewhere both widened in registers; either way the product equals the float64
    product of the same values. (That a native AVX512-BF16 build uses pairs:
    test_every_build_names_its_isa.)"""
    rng = np.random.default_rng(m * 1000 + n + k)
    x = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    w = weights(rng, (n, k), "bfloat16")
    text = jax.jit(cpu_kernels.small_batch_matmul).lower(jnp.asarray(x), jnp.asarray(w)).as_text()
    call = next(line for line in text.splitlines() if cpu_kernels.target(cpu_kernels.TARGET) in line)
    assert re.search(r"\(tensor<\d+x\d+xbf16>, tensor<\d+x\d+xbf16>\)", call), call
    raw = jax.jit(lambda a, b: jax.ffi.ffi_call(cpu_kernels.target(cpu_kernels.TARGET), jax.ShapeDtypeStruct((m, n), jnp.float32))(a, b))
    got = np.asarray(raw(jnp.asarray(x), jnp.asarray(w)), np.float64)
    want = reference(x.astype(np.float32), w, "bfloat16")
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


def test_stacked_layer_is_read_in_place(kernel):
    """A layer slice (traced index, as in a scan body) goes to the stacked kernel with the whole
    stack and the index, and gives that layer's product."""
    rng = np.random.default_rng(0)
    stack = jnp.asarray(rng.standard_normal((4, 48, 64)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((2, 1, 64)).astype(np.float32))

    def per_layer(stack, x):
        def body(h, i):
            w = cpu_kernels.layer_slice(stack, i)
            return h, cpu_kernels.small_batch_matmul(x, w)

        with cpu_kernels.layer_slices():
            return jax.lax.scan(body, 0, jnp.arange(4))[1]

    got = jax.jit(per_layer)(stack, x)
    text = jax.jit(per_layer).lower(stack, x).as_text()
    assert cpu_kernels.target(cpu_kernels.STACKED_TARGET) in text and f'"{cpu_kernels.target(cpu_kernels.TARGET)}"' not in text
    for i in range(4):
        want = reference(x[:, 0], np.asarray(stack[i]), "float32")
        assert np.abs(np.asarray(got[i, :, 0], np.float64) - want).max() <= RTOL * np.abs(want).max()


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("g,t,s,d,visible", [(3, 1, 37, 64, 37), (1, 2, 160, 48, 100), (4, 4, 5, 80, 3),
                                             (3, 1, 70, 64, 0)])  # fmt: skip
def test_cache_attention_kernels_equal_einsum(kernel, cache_dtype, stacked, g, t, s, d, visible):
    """Decode attention over a cache: scores (q . keys) and the mix (probs . values), with a head
    dim that is not a multiple of 64 and a cache read from a stack at a traced layer index. Only
    the ``visible`` columns are scored (the rest are 0); probabilities are 0 past them, as after
    the caller's mask, and the mix (which skips those values) still equals the full einsum."""
    rng = np.random.default_rng(g * 100 + s)
    b, h, layers = 2, 3, 4
    q = jnp.asarray(rng.standard_normal((b, h, g, t, d)).astype(np.float32))
    p = jnp.asarray(np.where(np.arange(s) < visible, rng.random((b, h, g, t, s)), 0).astype(np.float32))
    keys = jnp.asarray(rng.standard_normal((layers, b, h, s, d)).astype(np.float32)).astype(cache_dtype)
    values = jnp.asarray(rng.standard_normal((layers, b, h, s, d)).astype(np.float32)).astype(cache_dtype)

    def both(q, p, keys, values, layer):
        with cpu_kernels.layer_slices():
            if stacked:
                k, v = cpu_kernels.layer_slice(keys, layer), cpu_kernels.layer_slice(values, layer)
            else:
                k, v = keys[2], values[2]
            return cpu_kernels.cache_scores(q, k, visible), cpu_kernels.cache_mix(p, v)

    text = jax.jit(both).lower(q, p, keys, values, 2).as_text()
    assert cpu_kernels.target(cpu_kernels.CACHE_SCORES) in text and cpu_kernels.target(cpu_kernels.CACHE_MIX) in text
    scores, mixed = jax.jit(both)(q, p, keys, values, 2)
    f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)  # noqa: E731  (bf16 widened exactly)
    want_scores = np.einsum("bhgtd,bhsd->bhgts", f64(q), f64(keys[2]))[..., :visible]
    want_mix = np.einsum("bhgts,bhsd->bhgtd", f64(p), f64(values[2]))
    assert np.abs(f64(scores)[..., :visible] - want_scores).max(initial=0) <= RTOL * np.abs(want_scores).max(initial=0)
    assert (f64(scores)[..., visible:] == 0).all()
    assert np.abs(f64(mixed) - want_mix).max() <= RTOL * max(np.abs(want_mix).max(), 1)


def compiled_text(gen) -> str:
    return "\n".join(c.as_text() for c in gen._compiled.values())


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-neox", "tiny-mixtral"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_batched_decode_on_one_device_uses_the_kernel_and_equals_hf(kernel, preset, scan_layers, devices):
    """Batch 8 on one CPU device: the decode program calls the kernel (the stacked one when
    scanned) and every row's greedy tokens equal HF's batched generate."""
    hf, ours = hf_twin(preset)
    prompts = [[(7 * r + j) % 90 + 3 for j in range(12)] for r in range(8)]
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(8, 12, dtype=torch.long),
                           max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, 12:].tolist()  # fmt: skip
    gen = Generator(lift(ours, sharding.mesh_for("tp", 1, devices=devices), "tp", scan_layers=scan_layers),
                    eos_token_ids=[])  # fmt: skip
    got = gen.generate_ids(prompts, 24).token_ids
    assert got == want
    text = compiled_text(gen)
    assert (cpu_kernels.target(cpu_kernels.STACKED_TARGET) if scan_layers else f'"{cpu_kernels.target(cpu_kernels.TARGET)}"') in text
    assert cpu_kernels.target(cpu_kernels.CACHE_SCORES) in text and cpu_kernels.target(cpu_kernels.CACHE_MIX) in text


@pytest.mark.parametrize("scan_layers,n", [(True, 1), (False, 1), (True, 2)])
def test_a_transformers_class_reaches_the_kernels_through_standard_torch(kernel, scan_layers, n, devices):
    """Issue 31: transformers' own Llama, unchanged, at batch 8 on one CPU device (and tp on 2): its
    ``F.linear`` and its ``F.scaled_dot_product_attention`` over the cache (one new token a row)
    run in the bridge's kernels, scanned (the stacked cache carried through the scan, each layer's
    new columns written into it in place) or not, and the greedy tokens equal HF's."""
    import transformers as T

    from model_torch.hf_adapter import HFCausalLMAdapter

    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128, eos_token_id=None)).eval()  # fmt: skip
    hf.generation_config.eos_token_id = None
    prompts = [[(7 * r + j) % 90 + 3 for j in range(12)] for r in range(8)]
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(8, 12, dtype=torch.long),
                           max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, 12:].tolist()  # fmt: skip
    lifted = lift(HFCausalLMAdapter(hf), sharding.mesh_for("tp", n, devices=devices), "tp", scan_layers=scan_layers)
    gen = Generator(lifted, eos_token_ids=[])
    assert gen.generate_ids(prompts, 16).token_ids == want
    text = compiled_text(gen)
    assert (cpu_kernels.target(cpu_kernels.STACKED_TARGET) if scan_layers else f'"{cpu_kernels.target(cpu_kernels.TARGET)}"') in text
    assert cpu_kernels.target(cpu_kernels.CACHE_SCORES) in text and cpu_kernels.target(cpu_kernels.CACHE_MIX) in text


@pytest.mark.parametrize("scheme", ["tp", "dp_tp"])
def test_partitioned_on_a_sharded_mesh_and_off_when_switched_off(kernel, scheme, devices, monkeypatch):
    """On 8 devices each device runs the kernels on its own shards (a ``shard_map`` by the weight
    plan's and the cache's specs: the column-parallel products split, the row-parallel ones summed across devices, the cache split by
    batch and heads): the same tokens as one device, and no more communication than XLA's own dots
    (no operand gathered whole). With TORCHAX_BRIDGE_CPU_KERNELS=0 the program keeps XLA's dots,
    with the same tokens."""
    from bridge import hlo

    hf, ours = hf_twin("tiny-llama")
    prompts = [[3, 4, 5, 6]] * 4
    on = Generator(lift(ours, sharding.mesh_for("tp", 1, devices=devices), "tp"), eos_token_ids=[])
    tokens = on.generate_ids(prompts, 8).token_ids
    assert cpu_kernels.target(cpu_kernels.TARGET) in compiled_text(on)
    mesh = sharding.mesh_for(scheme, 8, devices=devices)
    sharded = Generator(lift(ours, mesh, scheme), eos_token_ids=[])
    assert sharded.generate_ids(prompts, 8).token_ids == tokens
    text = compiled_text(sharded)
    for kernel_target in (cpu_kernels.STACKED_TARGET, cpu_kernels.CACHE_SCORES, cpu_kernels.CACHE_MIX):
        assert cpu_kernels.target(kernel_target) in text
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    off = Generator(lift(ours, mesh, scheme), eos_token_ids=[])
    assert off.generate_ids(prompts, 8).token_ids == tokens
    assert not any(t in compiled_text(off) for t in cpu_kernels.TARGETS)
    assert cpu_kernels.why_unavailable() == f"{cpu_kernels.SWITCH}=0"
    moved = lambda gen: sum(c["bytes"] for c in hlo.collectives(compiled_text(gen)).values())  # noqa: E731
    assert moved(sharded) <= moved(off), (hlo.collectives(compiled_text(sharded)), hlo.collectives(compiled_text(off)))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_one_row_with_long_weight_rows_uses_the_kernel(kernel, scan_layers, devices, monkeypatch):
    """Batch 1 with 4096-wide weight rows (Llama-3-8B's width): XLA:CPU would re-lay-out every such
    weight on every step, so the kernel reads them; the logits of each step equal XLA's own run
    (kernels off) within fp32 tolerance and the greedy tokens are the same."""
    import model_torch

    torch.manual_seed(0)
    model = model_torch.from_preset("tiny-llama", hidden_size=cpu_kernels.ONE_ROW_MIN_K, num_heads=32, num_kv_heads=8,
                                    head_dim=128, intermediate_size=64, num_layers=2).eval()  # fmt: skip
    checkpoints.init_random(model)
    mesh = sharding.mesh_for("tp", 1, devices=devices)
    on = Generator(lift(model, mesh, "tp", scan_layers=scan_layers), eos_token_ids=[], after_request=())
    tokens = on.generate_ids([[3, 4, 5, 6]], 6).token_ids
    target = cpu_kernels.target(cpu_kernels.STACKED_TARGET) if scan_layers else f'"{cpu_kernels.target(cpu_kernels.TARGET)}"'
    assert target in compiled_text(on)
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    off = Generator(lift(model, mesh, "tp", scan_layers=scan_layers), eos_token_ids=[], after_request=())
    assert off.generate_ids([[3, 4, 5, 6]], 6).token_ids == tokens
    assert not any(t in compiled_text(off) for t in cpu_kernels.TARGETS)


def test_a_failed_build_leaves_xla_dots_and_says_why(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    cpu_kernels._library.cache_clear()
    cpu_kernels._why.clear()
    try:
        assert cpu_kernels._library("native") is None
        assert "no C++ compiler (no-such-compiler-here)" in cpu_kernels._why["native"]
    finally:
        cpu_kernels._library.cache_clear()
        cpu_kernels._why.clear()


def _cache_copies(gen, config, batch: int, dtype: str, scan_layers: bool) -> tuple[list[str], str]:
    """(lines of the decode loop's HLO that copy a layer's or the stack's KV cache, the loop's HLO)."""
    loop = next(c for k, c in gen._compiled.items() if k[0].startswith("loop/")).as_text()
    per_layer = rf"{dtype}\[{batch},{config.num_kv_heads},[1-9]\d+,{config.hidden_size // config.num_heads}\]"
    shape = rf"{dtype}\[{config.num_layers}," + per_layer[len(dtype) + 2 :] if scan_layers else per_layer
    copies = [line for line in loop.splitlines()
              if re.search(rf"= ({shape}|{per_layer})\S* (copy|convert)\(", line)]  # fmt: skip
    assert re.search(shape, loop)  # the pattern does name the cache
    return copies, loop


@pytest.mark.parametrize("scan_layers", [True, False])
def test_decode_updates_the_kv_cache_in_place(scan_layers, devices, monkeypatch):
    """The decode loop copies no layer's KV cache: each layer writes its new keys into the cache
    (``index_copy``) and attends over the written cache, so XLA updates the donated buffer in place.
    Checked with XLA's own dots (the attention reads the cache by an einsum)."""
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    hf, ours = hf_twin("tiny-llama")
    gen = Generator(lift(ours, sharding.mesh_for("tp", 1, devices=devices), "tp", scan_layers=scan_layers),
                    eos_token_ids=[])  # fmt: skip
    gen.generate_ids([[3, 4, 5, 6]] * 8, 8)
    copies, _ = _cache_copies(gen, ours.config, 8, "f32", scan_layers)
    assert not copies, copies[:2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scanned_decode_with_the_kernels_writes_the_stacked_cache_in_place(kernel, dtype, devices):
    """With the kernels, a scanned stack carries its cache through the scan: a layer's cache write
    (``LayerCaches.update``, which the scan swaps for its own) goes into the stacked cache and the
    attention kernels read their layer there, with no copy of a layer's cache or of the
    stack, and no f32 conversion of a bf16 one (XLA:CPU updated a bf16 stack by converting it
    whole, every layer of every step). Greedy tokens equal the unscanned model's."""
    _, ours = hf_twin("tiny-llama")
    ours = ours.to(getattr(torch, dtype))
    mesh = sharding.mesh_for("tp", 1, devices=devices)
    gen = Generator(lift(ours, mesh, "tp", scan_layers=True), eos_token_ids=[])
    got = gen.generate_ids([[3, 4, 5, 6]] * 8, 8).token_ids
    short = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    copies, loop = _cache_copies(gen, ours.config, 8, short, True)
    assert not copies, copies[:2]
    assert "cache_scores" in loop and "cache_mix" in loop  # the attention did go to the kernels
    unrolled = Generator(lift(ours, mesh, "tp", scan_layers=False), eos_token_ids=[])
    assert got == unrolled.generate_ids([[3, 4, 5, 6]] * 8, 8).token_ids


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_int8_and_bf16_batched_decode_read_their_weights(kernel, scan_layers, dtype, devices, monkeypatch):
    """int8 weight-only and bf16 at batch 8, in every build: the kernel is handed the int8 / bf16
    weights themselves (no f32 copy of them per step; bf16 rows go in as bf16 too: multiplied as
    pairs where the build has AVX512-BF16, widened inside the kernel elsewhere), and greedy tokens
    equal those of XLA's own path."""
    from bridge.quantize import quantize_int8

    _, ours = hf_twin("tiny-llama")
    if dtype == "int8":
        quantize_int8(ours)
    else:
        ours = ours.to(torch.bfloat16)
    prompts = [[(5 * r + j) % 90 + 3 for j in range(10)] for r in range(8)]
    mesh = sharding.mesh_for("tp", 1, devices=devices)
    on = Generator(lift(ours, mesh, "tp", scan_layers=scan_layers), eos_token_ids=[])
    tokens = on.generate_ids(prompts, 16).token_ids
    loop = next(c for k, c in on._compiled.items() if k[0].startswith("loop/")).as_text()
    calls = [line for line in loop.splitlines() if 'custom_call_target="torchax_bridge_small_batch_matmul' in line]
    operands = [re.search(r"custom-call\((%[^,)]+), (%[^,)]+)", line).groups() for line in calls]
    dtype_of = lambda name: re.search(rf"{re.escape(name)} = (\w+)\[", loop).group(1)  # noqa: E731
    rows, weight = {dtype_of(x) for x, _ in operands}, {dtype_of(w) for _, w in operands}
    assert len(calls) == (8 if scan_layers else 7 * ours.config.num_layers + 1), len(calls)
    # bf16 rows enter as they are (no conversion op before each product); the weights never widen
    assert (rows, weight) == (({"f32"}, {"s8"}) if dtype == "int8" else ({"bf16"}, {"bf16"})), (rows, weight)
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    off = Generator(lift(ours, mesh, "tp", scan_layers=scan_layers), eos_token_ids=[])
    want = off.generate_ids(prompts, 16).token_ids
    if dtype == "int8":
        assert want == tokens
    else:  # bf16: the two paths round differently (XLA's bf16 einsums over the cache round their
        # outputs to bf16), and this random model's logits have near-ties, so tokens part after a few
        # steps (seen at the second decode step). Both are held against an f32 run of the same
        # bf16-rounded weights: the kernel (f32 sums of exact bf16 products) must agree with it at
        # least as often as XLA's own bf16 program (measured: 123 vs 107 of 128 tokens, unrolled).
        _, f32 = hf_twin("tiny-llama")
        f32.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in f32.state_dict().items()})
        ref = Generator(lift(f32, mesh, "tp", scan_layers=scan_layers), eos_token_ids=[]).generate_ids(prompts, 16)
        agree = lambda got: sum(a == b for r, q in zip(got, ref.token_ids) for a, b in zip(r, q))  # noqa: E731
        assert [row[0] for row in want] == [row[0] for row in tokens]  # the prefill: one XLA program
        assert agree(tokens) >= agree(want), (agree(tokens), agree(want))


def test_without_a_compiler_batched_decode_runs_on_xla_and_equals_hf(devices, monkeypatch, tmp_path):
    """A machine with no C++ compiler (PATH and CXX hide it, an empty kernel cache): the kernel is
    unavailable with the reason, batch 8 decodes on XLA's own products, and its tokens equal HF's."""
    monkeypatch.setenv("CXX", "g++")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ there
    monkeypatch.setenv("TORCHAX_BRIDGE_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu_kernels.SWITCH, raising=False)
    monkeypatch.setattr(cpu_kernels, "_library", functools.cache(cpu_kernels._library.__wrapped__))
    monkeypatch.setattr(cpu_kernels, "_registered", functools.cache(cpu_kernels._registered.__wrapped__))
    monkeypatch.setattr(cpu_kernels, "_why", {})
    assert not cpu_kernels.available()
    assert cpu_kernels.why_unavailable() == "no C++ compiler (g++) on PATH; install g++ or set CXX"
    hf, ours = hf_twin("tiny-llama")
    prompts = [[(3 * r + j) % 90 + 3 for j in range(6)] for r in range(8)]
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(8, 6, dtype=torch.long),
                           max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, 6:].tolist()  # fmt: skip
    gen = Generator(lift(ours, sharding.mesh_for("tp", 1, devices=devices), "tp"), eos_token_ids=[])
    assert gen.generate_ids(prompts, 8).token_ids == want
    assert not any(t in compiled_text(gen) for t in cpu_kernels.TARGETS)


def _cross_tools() -> tuple[list[str], list[str]] | str:
    """(compiler, runner) for an aarch64 build of the check, or why there is none here."""
    import platform
    import shutil

    if platform.machine() in ("aarch64", "arm64"):
        return (["g++"], []) if shutil.which("g++") else "no g++"
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if not shutil.which(t)]
    if missing:
        return f"no {' or '.join(missing)} (Debian: apt-get install g++-aarch64-linux-gnu qemu-user)"
    return ["aarch64-linux-gnu-g++"], ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]


def _x86_with_gxx() -> bool:
    import platform
    import shutil

    return platform.machine() in ("x86_64", "AMD64") and shutil.which("g++") is not None


@pytest.mark.parametrize("build", [
    pytest.param("x86-64 baseline", marks=pytest.mark.skipif(not _x86_with_gxx(), reason="needs an x86-64 machine with g++")),
    pytest.param("aarch64", marks=pytest.mark.skipif(isinstance(_cross_tools(), str),
                                                     reason=f"the aarch64 check needs a cross compiler and qemu: {_cross_tools()}")),
])  # fmt: skip
def test_the_kernel_source_is_correct_at_other_vector_widths(build, tmp_path):
    """The same source built for the ISAs this machine cannot load into jaxlib: the x86-64 baseline
    (SSE2, 4 lanes: the code a NEON build runs) natively, and aarch64 (NEON) under qemu, each checked
    against a float64 reference by tests/kernels/portable_check.cc (products in f32, int8, bf16;
    the cache mix; tails of every size)."""
    import subprocess
    from pathlib import Path

    if build == "x86-64 baseline":
        cxx, runner, flags = ["g++"], [], ["-march=x86-64"]
    else:
        cxx, runner = _cross_tools()
        flags = []
    src = Path(__file__).parent / "kernels" / "portable_check.cc"
    exe = tmp_path / "check"
    subprocess.run([*cxx, "-O2", "-std=c++17", "-ffp-contract=fast", "-pthread", *flags, "-w",
                    f"-I{jax.ffi.include_dir()}", str(src), "-o", str(exe)], check=True)  # fmt: skip
    done = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == ("ok SSE2" if build == "x86-64 baseline" else "ok NEON")
