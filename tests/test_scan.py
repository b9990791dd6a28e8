"""The scanned decoder stack (``lift(..., scan_layers=True)``) against the unrolled one: logits at
1e-4 relative and the same greedy tokens, on 1 device and under tp and fsdp on 8; placements of
the stacked weights follow the per-layer table with the layer dim unsharded."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

import model_torch
import sharding
from bridge.generate import Generator
from bridge.lift import lift
from conftest import RTOL, max_rel, needs_compiler


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-neox", "tiny-mixtral", "tiny-grok"])
@pytest.mark.parametrize("scheme,n", [("replicated", 1), ("tp", 8), ("fsdp", 8)])
def test_scanned_stack_equals_unrolled(preset, scheme, n, devices):
    torch.manual_seed(0)
    model = model_torch.from_preset(preset)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12)).astype(np.int32)
    mesh = sharding.mesh_for(scheme, n, devices=devices[:n])
    unrolled, scanned = lift(model, mesh, scheme, scan_layers=False), lift(model, mesh, scheme, scan_layers=True)
    assert max_rel(scanned.forward(ids), unrolled.forward(ids)) < RTOL
    prompt = [list(ids[0]), list(ids[1][:7])]  # a left-padded batch through the cache
    want = Generator(unrolled, stop_at_eos=False).generate_ids(prompt, 8).token_ids
    got = Generator(scanned, stop_at_eos=False).generate_ids(prompt, 8).token_ids
    assert got == want


@needs_compiler
@pytest.mark.parametrize("scheme,n", [("replicated", 1), ("tp", 8)])
def test_scanned_bf16_stack_is_sliced_by_layer_not_converted(scheme, n, devices, monkeypatch):
    """A bf16 stack on CPU: each layer copied out of the stack by the kernels' layer copy (XLA:CPU
    would convert the whole stack to f32 and hoist that out of the scan), on 1 device and on each
    device's shards under tp 8: the forward's logits bitwise those of XLA's own slicing (kernels
    switched off), within bf16 rounding (3e-2 relative) of unrolled, the same greedy tokens as
    unrolled; the compiled forward's temporaries hold no copy of the stack (XLA's slicing: two);
    gradients through the copy equal those through XLA's slice."""
    import jax
    import jax.numpy as jnp

    from bridge import cpu_kernels

    torch.manual_seed(0)
    model = model_torch.from_preset("tiny-llama").to(torch.bfloat16)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12)).astype(np.int32)
    mesh = sharding.mesh_for(scheme, n, devices=devices[:n])
    unrolled, scanned = lift(model, mesh, scheme, scan_layers=False), lift(model, mesh, scheme, scan_layers=True)
    if cpu_kernels.why_unavailable() is not None:  # any CPU builds them where a compiler is (see needs_compiler)
        pytest.fail(f"the kernels failed to build with a compiler present: {cpu_kernels.why_unavailable()}")
    logits = np.asarray(scanned.forward(ids), np.float32)
    assert max_rel(logits, np.asarray(unrolled.forward(ids), np.float32)) < 3e-2
    with monkeypatch.context() as m:
        m.setenv(cpu_kernels.SWITCH, "0")
        xla_sliced = lift(model, mesh, scheme, scan_layers=True)
        assert not cpu_kernels.available()
        assert np.array_equal(np.asarray(xla_sliced.forward(ids), np.float32), logits)
    # XLA's slicing converts the whole stack: temporaries of twice its bytes; here less than once.
    stack = sum(w.addressable_shards[0].data.nbytes for k, w in scanned.weights.items() if "*." in k)  # per device
    temps = scanned.compiled_forward(ids).memory_analysis().temp_size_in_bytes
    assert temps < stack <= xla_sliced.compiled_forward(ids).memory_analysis().temp_size_in_bytes / 2, (temps, stack)
    prompt = [list(ids[0]), list(ids[1][:7])]
    want = Generator(unrolled, stop_at_eos=False).generate_ids(prompt, 8).token_ids
    assert Generator(scanned, stop_at_eos=False).generate_ids(prompt, 8).token_ids == want

    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 5)), jnp.bfloat16)

    def loss(w, sliced):
        return sum(jnp.sum(sliced(w, i).astype(jnp.float32) ** 2) * (i + 1) for i in range(3))

    one = sharding.mesh_for("replicated", 1, devices=devices[:1])
    with cpu_kernels.placed(one, None):
        assert cpu_kernels.copies_layers(w)
        got = jax.grad(loss)(w, cpu_kernels.layer_slice)
    want = jax.grad(loss)(w, lambda w, i: w[i])
    assert np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_stacked_placements_follow_the_per_layer_table(devices):
    model = model_torch.from_preset("tiny-llama")
    mesh = sharding.mesh_for("tp", 8, devices=devices)
    unrolled, scanned = lift(model, mesh, "tp"), lift(model, mesh, "tp", scan_layers=True)
    n = model.config.num_layers
    assert not any(".0." in k for k in scanned.weights)  # one name per stacked tensor
    for name, p in unrolled.placements.items():
        stacked = name.replace("model.layers.0.", "model.layers.*.")
        if stacked != name:
            q = scanned.placements[stacked]
            assert q.shape == (n, *p.shape) and q.spec == sharding.P(None, *p.spec)
        elif "model.layers." not in name:
            assert scanned.placements[name].spec == p.spec
    assert scanned.report()["param_bytes_per_device"] == unrolled.report()["param_bytes_per_device"]


def test_generate_command_with_scan_layers(devices, capfd):
    import json

    from bridge import cli

    argv = ["generate", "--checkpoint", "tiny-llama", "--input-ids", "5,6,7,8", "--max-new-tokens", "6", "--json",
            "--devices", "2", "--scheme", "tp"]  # fmt: skip
    assert cli.main(argv) == 0
    want = json.loads(capfd.readouterr().out.strip().splitlines()[-1])["token_ids"]
    assert cli.main([*argv, "--scan-layers"]) == 0
    assert json.loads(capfd.readouterr().out.strip().splitlines()[-1])["token_ids"] == want


def test_direct_to_mesh_loading_into_the_stacked_layout(tmp_path, devices):
    """A save_pretrained checkpoint read straight into stacked weights on the mesh (each device's
    slice of every layer, no host copy of the model) equals loading, then stacking."""
    import transformers as T

    from bridge import checkpoints
    from bridge.lift import lift_checkpoint

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    mesh = sharding.mesh_for("tp", 2, devices=devices[:2])
    direct = lift_checkpoint(tmp_path / "ckpt", mesh, "tp", scan_layers=True)
    loaded = lift(checkpoints.load(str(tmp_path / "ckpt"), with_tokenizer=False).model, mesh, "tp", scan_layers=True)
    assert set(direct.weights) == set(loaded.weights) and any("*." in k for k in direct.weights)
    for k, w in loaded.weights.items():
        assert direct.weights[k].sharding.spec == w.sharding.spec
        np.testing.assert_array_equal(np.asarray(direct.weights[k]), np.asarray(w))
    ids = np.random.default_rng(0).integers(0, 256, (1, 10)).astype(np.int32)
    assert max_rel(direct.forward(ids), loaded.forward(ids)) < RTOL


def test_profile_of_a_scanned_stack_reports_time_per_layer(tmp_path, devices):
    from bridge import profiling

    model = model_torch.from_preset("tiny-llama")
    lifted = lift(model, sharding.mesh_for("tp", 2, devices=devices[:2]), "tp", scan_layers=True)
    summary = profiling.profile(lifted, "decode", steps=2, logdir=tmp_path, batch=1, seq=32)
    n = model.config.num_layers
    assert f"layers.*.self_attn (per layer, {n} scanned)" in summary["layers_ms"]
    assert f"layers.*.mlp (per layer, {n} scanned)" in summary["layers_ms"]
    assert not any(k.startswith("layers.1") for k in summary["layers_ms"])


def test_compare_runs_schemes_scanned_against_the_unrolled_reference(devices):
    from bridge import experiments

    model = model_torch.from_preset("tiny-llama")
    rows = experiments.compare(model, ["tp", "fsdp"], devices, "decode", batch=8, seq=32, repeats=1, scan_layers=True)
    assert [r.status for r in rows] == ["ok", "ok"]
    assert all(r.max_rel_diff < RTOL for r in rows)


def test_scanned_int8_and_export_give_the_unrolled_tokens(tmp_path, devices):
    from bridge import exported
    from bridge.export import export_causal_lm
    from bridge.models import open_model

    prompt = [5, 6, 7, 8]
    want = Generator(open_model("tiny-llama", devices=2, scheme="tp"), stop_at_eos=False).generate_ids([prompt], 6)
    scanned = open_model("tiny-llama", devices=2, scheme="tp", scan_layers=True)
    export_causal_lm(scanned, tmp_path / "exp", prompt_len=16, max_new_tokens=8)
    assert exported.load(tmp_path / "exp", devices[:2]).generate([prompt], 6) == want.token_ids
    q = [Generator(open_model("tiny-llama", devices=2, scheme="tp", quantize="int8", scan_layers=s),
                   stop_at_eos=False).generate_ids([prompt], 6).token_ids for s in (False, True)]  # fmt: skip
    assert q[0] == q[1]


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_gradients_and_steps_equal_unrolled(remat, devices):
    import jax
    import optax

    from bridge.train import Trainer

    torch.manual_seed(0)
    model = model_torch.from_preset("tiny-mixtral")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (8, 16)).astype(np.int32)
    mesh = sharding.mesh_for("fsdp", 8, devices=devices)
    flat = Trainer(lift(model, mesh, "fsdp", scan_layers=False), optax.adamw(1e-3), remat=remat)
    scanned = Trainer(lift(model, mesh, "fsdp", scan_layers=True), optax.adamw(1e-3), remat=remat)
    _, g_flat, _ = jax.jit(flat.grads)(flat.params(), flat.put_batch(ids))
    _, g_scan, _ = jax.jit(scanned.grads)(scanned.params(), scanned.put_batch(ids))
    n = model.config.num_layers
    for name, g in g_scan.items():
        parts = [g_flat[name.replace("*.", f"{i}.", 1)] for i in range(n)] if "*." in name else [g_flat[name]]
        want = np.stack([np.asarray(p) for p in parts]) if "*." in name else np.asarray(parts[0])
        assert np.abs(np.asarray(g) - want).max() <= 1e-4 * (np.abs(want).max() or 1.0), name
    if remat:  # remat changes what is kept for the backward pass, not the update: the gradients say it
        return
    a, b = flat.init(), scanned.init()
    for _ in range(3):
        a, la = flat.step(a, ids)
        b, lb = scanned.step(b, ids)
        assert abs(float(la) - float(lb)) < 1e-5 * float(la)


def test_scanned_by_default_where_it_pays(devices, monkeypatch):
    """The default: model_torch families scan, and so does any module with a stack of identical
    layers; a module without one does not (and asking for it is an error naming why); bf16 and int8
    models on CPU scan where the CPU kernels' layer copy slices their stack, and run unrolled without
    the kernels, since XLA:CPU converts a bf16 stack to f32 to slice it (``scan._slow_16_bit_slices``);
    plan, which never runs the program, reports that same default and scans them when asked."""
    import jax

    from bridge import cpu_kernels, scan
    from bridge.errors import UsageError
    from bridge.plan import abstract_lifted, meta_model
    from bridge.quantize import quantize_int8

    mesh = sharding.mesh_for("replicated", 1, devices=devices)
    fp32 = model_torch.from_preset("tiny-llama")
    assert lift(fp32, mesh, "replicated").scan_layers
    assert not lift(fp32, mesh, "replicated", scan_layers=False).scan_layers
    bf16 = model_torch.from_preset("tiny-llama").to(torch.bfloat16)
    int8 = model_torch.from_preset("tiny-llama")
    quantize_int8(int8)
    int8 = int8.to(torch.bfloat16)
    meta_bf16 = meta_model("tiny-llama", "bfloat16")
    replicated = sharding.get_scheme("replicated")
    assert jax.default_backend() == "cpu"
    for model in (bf16, int8):
        assert lift(model, mesh, "replicated").scan_layers == cpu_kernels.available()
    assert abstract_lifted(meta_bf16, mesh, replicated, "error").scan_layers == cpu_kernels.available()
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")  # no kernels (as with no compiler): unrolled
    for model in (bf16, int8):
        assert not lift(model, mesh, "replicated").scan_layers
    assert lift(bf16, mesh, "replicated", scan_layers=True).scan_layers
    # plan reports the program generate runs here: the bf16 stack unrolled, scanned when asked.
    assert not abstract_lifted(meta_bf16, mesh, replicated, "error").scan_layers
    assert abstract_lifted(meta_bf16, mesh, replicated, "error", scan_layers=True).scan_layers
    # On a GPU every dtype runs unrolled by default (measured on an H200 in ``scan._slow_gpu_slices``);
    # asking for the scan still scans.
    with mock.patch.object(scan.jax, "default_backend", return_value="gpu"):
        assert not scan.scans(fp32) and scan.scans(fp32, True)
    assert scan.scans(fp32)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert not scan.scans(plain)
    with pytest.raises(UsageError, match="no ModuleList or Sequential of two or more identical layers"):
        scan.scans(plain, True)
    tower = torch.nn.Sequential(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)]), torch.nn.ReLU())
    assert scan.scans(tower) and scan.stack_path(tower) == "0"  # any stack of identical layers


def test_a_scanned_transformers_class_checks_profiles_plans_and_exports(tmp_path, devices):
    """transformers' own Llama through the adapter, its stack scanned by the bridge, under tp on 2:
    ``check`` compares every layer with eager torch, ``profile`` reports time per layer block of the
    scan, ``plan`` compiles the whole scanned model once (exact, not extrapolated) and places what
    generate places, and an export decodes generate's greedy tokens. (Training through the adapter:
    ``test_train.py``'s Qwen3 rows.)"""
    import re

    import transformers as T

    from bridge import exported, profiling
    from bridge import plan as planner
    from bridge.check import check_module, format_check
    from bridge.export import export_causal_lm
    from bridge.models import open_model

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    T.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    lifted = open_model(str(tmp_path / "llama"), devices=devices[:2], scheme="tp", implementation="transformers",
                        with_tokenizer=False)  # fmt: skip
    assert type(lifted.model).__name__ == "HFCausalLMAdapter" and lifted.scan_layers
    ids = torch.randint(0, 256, (2, 12))
    report = check_module(lifted.model, (ids,), mesh=lifted.mesh, scheme="tp", scan_layers=True)
    assert report.ok, format_check(report)
    assert {m.group(1) for r in report.rows if (m := re.search(r"\.layers\.(\d+)\.", r.module))} == {"0", "1", "2"}
    summary = profiling.profile(lifted, "decode", steps=2, logdir=tmp_path / "trace", batch=1, seq=32)
    per_layer = [k for k in summary["layers_ms"] if "(per layer, 3 scanned)" in k]
    assert any("self_attn" in k for k in per_layer) and any("mlp" in k for k in per_layer), summary["layers_ms"]
    p = planner.plan(config, lifted.mesh, "tp", dtype="float32", mode="decode", batch=1, seq=32, scan_layers=True)
    assert p["extrapolated"] is None and p["scan_layers"] and "once" in p["compiled"]
    assert p["param_bytes_per_device"] == sum(a.addressable_shards[0].data.nbytes for a in lifted.weights.values())
    prompt = [5, 6, 7, 8, 9]
    want = Generator(lifted, stop_at_eos=False).generate_ids([prompt], 6).token_ids
    export_causal_lm(lifted, tmp_path / "exp", prompt_len=16, max_new_tokens=8)
    assert exported.load(tmp_path / "exp", devices[:2]).generate([prompt], 6) == want
