"""sharding.py: rule tables, validation, reports, and what the compiled program really does."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from jax.sharding import AxisType, PartitionSpec as P

import model_torch
import sharding
from bridge import hlo as hlo_analysis
from bridge.lift import lift
from conftest import RTOL, max_rel, random_ids

FAMILIES = ["tiny-llama", "tiny-neox", "tiny-grok", "tiny-mixtral"]


def model_of(preset):
    torch.manual_seed(0)
    model = model_torch.from_preset(preset).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


@pytest.mark.parametrize("scheme", list(sharding.SCHEMES))
@pytest.mark.parametrize("preset", FAMILIES)
def test_sharded_logits_equal_unsharded(preset, scheme, devices):
    model = model_of(preset)
    ids = random_ids(model.config.vocab_size, (2, 16)).numpy()
    ref = lift(model, sharding.mesh_for("replicated", 1, devices=devices), "replicated").forward(ids)
    lifted = lift(model, sharding.mesh_for(scheme, 8, devices=devices), scheme)
    assert len(lifted.mesh.devices.flat) == 8
    assert max_rel(lifted.forward(ids), ref) < RTOL


def test_smollm2_every_scheme_on_8_devices(smollm2, devices):
    ids = np.asarray([smollm2.tokenizer.encode("The capital of France is")])
    ref = lift(smollm2.model, sharding.mesh_for("replicated", 1, devices=devices), "replicated").forward(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for scheme in ["tp", "fsdp", "dp", "dp_tp"]:
            lifted = lift(smollm2.model, sharding.mesh_for(scheme, 8, devices=devices), scheme, fallback="replicate")
            assert max_rel(lifted.forward(ids), ref) < RTOL, scheme


def test_mesh_axes_are_auto(devices):
    mesh = sharding.mesh_for("dp_tp", 8, devices=devices)
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(sharding.mesh_for("dp_tp", 8, {"data": 4}, devices).shape) == {"data": 4, "model": 2}
    with pytest.raises(sharding.ShardingError, match="--mesh"):
        sharding.mesh_for("dp_tp", 8, {"data": 3}, devices)


# ---------------------------------------------------------------------------------------------------
# The compiled program
# ---------------------------------------------------------------------------------------------------
def collectives_of(lifted, seq=16):
    return hlo_analysis.compiled_stats(lifted.compiled_forward(np.zeros((1, seq), np.int32)))


def test_tp_llama_has_two_all_reduces_per_layer(devices):
    import dataclasses

    base = model_torch.PRESETS["tiny-llama"][1]
    model = model_torch.llama.LlamaForCausalLM(dataclasses.replace(base, num_layers=4)).eval()
    lifted = lift(model, sharding.mesh_for("tp", 8, devices=devices), "tp")
    stats = collectives_of(lifted)
    c = stats["collectives"]
    layers = 4
    assert 2 * layers <= c["all-reduce"]["count"] <= 2 * layers + 2, c
    # No weight is gathered: every all-gather (if any) is of activations, far smaller than a weight.
    weight_bytes = min(p.bytes_per_device(dict(lifted.mesh.shape)) for p in lifted.placements.values() if not p.replicated)
    gathered = [shape for kind, shape in hlo_analysis.collective_instructions(lifted.compiled_forward(np.zeros((1, 16), np.int32)).as_text()) if kind == "all-gather"]
    assert all(sharding._shape_bytes(s) < 4 * 256 * 16 + 1 for s in gathered), gathered  # at most the [1,16,vocab] logits
    assert c["reduce-scatter"]["count"] == 0 and c["all-to-all"]["count"] == 0
    assert weight_bytes > 0


@pytest.mark.parametrize("scan", [False, True])
def test_fsdp_gathers_weights_and_holds_one_eighth(devices, scan):
    model = model_of("tiny-llama")
    lifted = lift(model, sharding.mesh_for("fsdp", 8, devices=devices), "fsdp", scan_layers=scan)
    # Batch 8 over the fsdp axis, activations pinned to it: every layer weight is gathered whole
    # (7 matrices per layer), rather than XLA moving activations around a sharded weight. Scanned,
    # the gathers sit in the scan body, once per layer's slice.
    hlo = lifted.compiled_forward(np.zeros((8, 16), np.int32)).as_text()
    # A weight may be gathered as stored [out, in] or already transposed for its matmul ([in, out]).
    shapes = [lifted.placement(p.name.replace("*.", "0.")).shape for p in lifted.placements.values()
              if not p.replicated and ".layers." in p.name]  # fmt: skip
    layer_weights = [{f"f32[{','.join(map(str, shape))}]" for shape in (s, s[::-1])} for s in shapes]
    gathered = [s.split("{")[0] for kind, s in hlo_analysis.collective_instructions(hlo) if kind == "all-gather"]
    per_program = 7 if scan else 7 * model.config.num_layers
    assert sum(any(g in w for w in layer_weights) for g in gathered) >= per_program, gathered
    assert all(w & set(gathered) for w in layer_weights)
    rep = lifted.report()
    assert rep["param_bytes_per_device"] <= rep["param_bytes_total"] / 8 * 1.05  # norms stay replicated
    gate = lifted.weight("model.layers.0.mlp.gate_proj.weight")
    assert gate.sharding.spec == P("fsdp") and gate.addressable_shards[0].data.shape == (32, 128)  # largest dim 256


def test_tp_bytes_per_device_match_report_and_real_shards(devices):
    model = model_of("tiny-llama")
    lifted = lift(model, sharding.mesh_for("tp", 8, devices=devices), "tp")
    rep = lifted.report()
    sharded = sum(p.bytes_total() for p in lifted.placements.values() if not p.replicated)
    replicated = sum(p.bytes_total() for p in lifted.placements.values() if p.replicated)
    assert rep["param_bytes_per_device"] <= sharded / 8 + replicated
    real = sum(a.addressable_shards[0].data.nbytes for a in lifted.weights.values())
    assert real == rep["param_bytes_per_device"]
    assert rep["replicated_fraction"] == pytest.approx(replicated / (sharded + replicated))


def test_ep_places_experts_on_the_expert_axis(devices):
    lifted = lift(model_of("tiny-grok"), sharding.mesh_for("ep", 8, devices=devices), "ep")
    w = lifted.weight("model.layers.0.mlp.experts.gate_up_proj")
    assert w.sharding.spec == P("expert", None) and w.addressable_shards[0].data.shape[0] == 1
    lifted = lift(model_of("tiny-grok"), sharding.mesh_for("ep_tp", 8, devices=devices), "ep_tp")
    w = lifted.weight("model.layers.0.mlp.experts.down_proj")
    ffn = lifted.model.config.intermediate_size
    assert w.sharding.spec == P("expert", None, "model") and w.addressable_shards[0].data.shape == (4, 64, ffn // 4)


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------
def test_smollm2_tp8_head_split_is_a_clear_error_with_a_suggestion(smollm2, devices):
    with pytest.raises(sharding.ShardingError) as e:
        lift(smollm2.model, sharding.mesh_for("tp", 8, devices=devices), "tp")
    msg = str(e.value)
    assert "heads" in msg and "q_proj" in msg and "3" in msg and "--fallback replicate" in msg


def test_smollm2_tp3_splits_heads_cleanly(smollm2, devices):
    ids = np.asarray([smollm2.tokenizer.encode("Hello there")])
    ref = lift(smollm2.model, sharding.mesh_for("replicated", 1, devices=devices), "replicated").forward(ids)
    lifted = lift(smollm2.model, sharding.mesh_for("tp", 3, devices=devices), "tp")
    assert not any(p.fallback for p in lifted.placements.values())
    assert lifted.weight("model.layers.0.self_attn.k_proj.weight").addressable_shards[0].data.shape == (64, 576)
    assert max_rel(lifted.forward(ids), ref) < RTOL


def test_indivisible_dim_error_names_everything():
    shapes = {"layer.mlp.up_proj.weight": ((100, 64), np.float32)}
    with pytest.raises(sharding.ShardingError) as e:
        sharding.resolve_placements(shapes, sharding.get_scheme("tp"), {"model": 8})
    msg = str(e.value)
    for needle in ["layer.mlp.up_proj.weight", "[100, 64]", "up_proj", "size 8", "4"]:
        assert needle in msg, (needle, msg)
    with pytest.warns(UserWarning, match="replicated"):
        placed = sharding.resolve_placements(shapes, sharding.get_scheme("tp"), {"model": 8}, fallback="replicate")
    assert placed["layer.mlp.up_proj.weight"].spec == P() and placed["layer.mlp.up_proj.weight"].fallback


def test_unmatched_parameter_is_an_error_without_catch_all():
    scheme = sharding.scheme_from_rows("partial", [[r"q_proj\.weight$", ["model"]]])
    with pytest.raises(sharding.ShardingError, match="matches no rule"):
        sharding.resolve_placements({"a.norm.weight": ((8,), np.float32)}, scheme, {"model": 2})


def test_unknown_scheme_lists_the_choices():
    with pytest.raises(sharding.ShardingError, match="tp.*fsdp"):
        sharding.get_scheme("megatron-9000")


def test_user_schemes_from_python_and_json(tmp_path, devices):
    py = tmp_path / "rules.py"
    py.write_text(
        "import sharding\n"
        "MLP_ONLY = [(r'\\.(gate_proj|up_proj)\\.weight$', ['model']), (r'\\.down_proj\\.weight$', [None, 'model']), ('.*', [])]\n"
    )
    js = tmp_path / "rules.json"
    js.write_text(json.dumps({"rules": [[r"\.(gate_proj|up_proj)\.weight$", ["data", None]], [".*", []]],
                              "mesh": {"data": -1}, "batch_axes": ["data"]}))  # fmt: skip
    model = model_of("tiny-llama")
    ids = random_ids(256, (2, 8)).numpy()
    ref = lift(model, sharding.mesh_for("replicated", 1, devices=devices), "replicated").forward(ids)
    for spec, probe, want in [(f"{py}:MLP_ONLY", "model.layers.0.mlp.up_proj.weight", P("model")),
                              (str(js), "model.layers.0.mlp.up_proj.weight", P("data", None))]:  # fmt: skip
        scheme = sharding.get_scheme(spec)
        lifted = lift(model, sharding.mesh_for(scheme, 8, devices=devices), scheme)
        assert lifted.weight(probe).sharding.spec == want
        assert lifted.weight("model.layers.0.self_attn.q_proj.weight").sharding.spec == P()
        assert max_rel(lifted.forward(ids), ref) < RTOL


def test_collective_parser_counts_kinds_and_bytes():
    hlo = """
  %all-reduce.1 = f32[2,8]{1,0} all-reduce(f32[2,8]{1,0} %x), replica_groups={}
  %ag = bf16[4,16]{1,0} all-gather(bf16[1,16]{1,0} %y), dimensions={0}
  %ars = (f32[4]{0}, f32[4]{0}) all-reduce-start(f32[4]{0} %z), replica_groups={}
  %ard = f32[4]{0} all-reduce-done((f32[4]{0}, f32[4]{0}) %ars)
  ROOT %cp = s32[3]{0} collective-permute(s32[3]{0} %w), source_target_pairs={{0,1}}
"""
    c = hlo_analysis.collectives(hlo)
    assert c["all-reduce"] == {"count": 2, "bytes": 2 * 8 * 4 + 4 * 4}
    assert c["all-gather"] == {"count": 1, "bytes": 4 * 16 * 2}
    assert c["collective-permute"] == {"count": 1, "bytes": 12}


def test_kv_cache_spec_follows_heads(devices):
    mesh = sharding.mesh_for("dp_tp", 8, devices=devices)  # data=2, model=4
    from bridge import kv_cache

    assert kv_cache.spec(sharding.get_scheme("dp_tp"), mesh, batch=2, kv_heads=8) == P("data", "model", None, None)
    assert kv_cache.spec(sharding.get_scheme("dp_tp"), mesh, batch=1, kv_heads=3) == P(None, None, None, None)
    assert kv_cache.spec(sharding.get_scheme("dp_tp"), mesh, batch=2, kv_heads=8, stacked=True) == P(None, "data", "model", None, None)


def test_shardings_cli_prints_report_and_collectives():
    proc = subprocess.run([sys.executable, "-m", "bridge", "shardings", "--checkpoint", "tiny-llama", "--devices", "8",
                           "--scheme", "tp", "--rows", "5"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "bytes/device" in proc.stdout and "all-reduce x" in proc.stdout and "peak" in proc.stdout


def test_fewer_kv_heads_than_the_model_axis_are_repeated_not_replicated(devices):
    """8 query and 2 kv heads under tp on 8 devices: each kv head repeated 4 times (vLLM's way), so
    every device holds one kv head of k/v (1/2 of the full projection, not all of it), the KV cache
    splits the same way, and logits and greedy tokens equal one device."""
    from bridge.generate import Generator

    torch.manual_seed(0)
    model = model_torch.from_preset("tiny-llama", num_heads=8, num_kv_heads=2).eval()
    assert model.config.num_heads == 8
    ids = random_ids(model.config.vocab_size, (2, 12), seed=4)
    one = lift(model, sharding.mesh_for("replicated", 1, devices=devices[:1]), "replicated")
    tp = lift(model, sharding.mesh_for("tp", 8, devices=devices), "tp")
    assert tp.kv_head_copies == 4
    k = tp.placement("model.layers.0.self_attn.k_proj.weight")
    full = model.model.layers[0].self_attn.k_proj.weight
    assert k.spec == P("model") and k.bytes_per_device({"model": 8}) * 2 == full.numel() * full.element_size()
    assert max_rel(np.asarray(tp.forward(ids.numpy())), np.asarray(one.forward(ids.numpy()))) < RTOL
    rows = ids.tolist()
    a = Generator(tp, stop_at_eos=False).generate_ids(rows, 10).token_ids
    b = Generator(one, stop_at_eos=False).generate_ids(rows, 10).token_ids
    assert a == b
    from bridge import kv_cache

    assert kv_cache.placement(tp, 2).spec[1 + tp.scan_layers] == "model"  # scanned: a leading layer dim
