"""Checkpoint formats, partition merge, restore rules, conversion, direct-to-mesh loading, int8."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import model_torch
import sharding
from bridge import checkpoints, partitions
from bridge.quantize import quantize_int8
from bridge.checkpoints import CheckpointError
from bridge.lift import lift, lift_checkpoint
from conftest import RTOL, max_rel, random_ids


def tiny_hf_llama(tmp_path, shard_bytes=None, fmt="safetensors"):
    """A random HF Llama written by transformers itself (the format's own library)."""
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256)  # fmt: skip
    hf = transformers.LlamaForCausalLM(hc).eval()
    d = tmp_path / "ckpt"
    if fmt == "bin":
        d.mkdir()
        hc.save_pretrained(d)
        torch.save(hf.state_dict(), d / "pytorch_model.bin")
    else:
        hf.save_pretrained(d, max_shard_size=shard_bytes or "10GB")
    return hf, d


@pytest.mark.parametrize("fmt", ["single", "sharded", "bin"])
def test_round_trip_every_hf_format(tmp_path, fmt):
    hf, d = tiny_hf_llama(tmp_path, shard_bytes=200_000 if fmt == "sharded" else None, fmt="bin" if fmt == "bin" else "st")
    if fmt == "sharded":
        assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    loaded = checkpoints.load(str(d), with_tokenizer=False)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    ours = loaded.model.state_dict()
    for k, v in hf.state_dict().items():
        assert torch.equal(ours[k], v), k


def test_gguf_round_trip_through_transformers(smollm2):
    """The packaged GGUF, dequantised by transformers, equals what our loader placed in the model."""
    hf, _ = checkpoints.load_gguf_transformers(checkpoints.smollm2_gguf())
    ours = smollm2.model.state_dict()
    for k, v in hf.state_dict().items():
        assert torch.equal(ours[k], v), k


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    _, d = tiny_hf_llama(tmp_path, shard_bytes=200_000)
    victim = sorted(d.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match=victim.name):
        checkpoints.load(str(d), with_tokenizer=False)
    victim.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=victim.name):
        checkpoints.load(str(d), with_tokenizer=False)
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {victim.name}"):
        checkpoints.load(str(d), with_tokenizer=False)


def test_key_mismatch_lists_all_missing_and_unexpected_sorted(tmp_path):
    _, d = tiny_hf_llama(tmp_path)
    state = load_file(d / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    state.pop("model.layers.0.self_attn.q_proj.weight")
    state["model.extra.weight"] = torch.zeros(1)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        checkpoints.load(str(d), with_tokenizer=False)
    msg = str(e.value)
    assert "missing in checkpoint: ['model.layers.0.self_attn.q_proj.weight', 'model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected in checkpoint: ['model.extra.weight']" in msg


def test_shape_mismatch_names_tensor_and_both_shapes():
    model = model_torch.from_preset("tiny-llama")
    state = dict(model.state_dict())
    state["model.norm.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: checkpoint \[7\], model \[128\]"):
        checkpoints.load_into(model, state)


def test_restore_rules_rename_and_exclude(caplog):
    src = model_torch.from_preset("tiny-llama")
    state = {k.replace("model.", "transformer.", 1): v for k, v in src.state_dict().items()}
    dst = model_torch.from_preset("tiny-llama")
    fresh = dst.model.norm.weight.detach().clone() + 5
    dst.model.norm.weight.data = fresh.clone()
    with caplog.at_level("INFO", logger="torchax_bridge.checkpoints"):
        checkpoints.load_into(dst, state, renames=[(r"^transformer\.", "model.")], excludes=[r"^model\.norm\."])
    assert torch.equal(dst.model.layers[0].self_attn.q_proj.weight, src.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(dst.model.norm.weight, fresh)  # excluded: kept its fresh value
    assert "keeping the fresh model.norm.weight" in caplog.text and "transformer.lm_head.weight" not in caplog.text
    assert "-> model.layers.0.mlp.up_proj.weight" in caplog.text


@pytest.mark.parametrize("n", [2, 4])
def test_neox_partitions_split_and_merge_exactly(tmp_path, n):
    torch.manual_seed(0)
    model = model_torch.from_preset("tiny-neox")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    partitions.write_neox_partitions(state, model.config.num_layers, n, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "layer_00-model_00-model_states.pt" in files and len(files) == n * (model.config.num_layers + 3)
    merged = partitions.load_neox_partitions(tmp_path, model.config.num_layers)
    assert set(merged) == set(state)
    for k in state:
        assert torch.equal(merged[k], state[k]), k


def test_tampered_layer_norm_copy_is_detected(tmp_path):
    model = model_torch.from_preset("tiny-neox")
    partitions.write_neox_partitions(model.state_dict(), model.config.num_layers, 2, tmp_path)
    f = tmp_path / "layer_03-model_01-model_states.pt"
    part = torch.load(f, weights_only=True)
    part["input_layernorm.weight"][0] += 1e-3
    torch.save(part, f)
    with pytest.raises(CheckpointError, match=r"input_layernorm\.weight in layer file 03: partition 1 differs"):
        partitions.load_neox_partitions(tmp_path, model.config.num_layers)


def test_convert_writes_a_loadable_directory(tmp_path, smollm2):
    dst = tmp_path / "converted"
    checkpoints.convert("smollm2", dst, max_shard_bytes=100 << 20)
    assert json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    back = checkpoints.load(str(dst))
    ids = torch.tensor([smollm2.tokenizer.encode("hello world")])
    with torch.no_grad():
        assert torch.equal(back.model(ids)[0], smollm2.model(ids)[0])
    assert back.tokenizer.chat_template == smollm2.tokenizer.chat_template
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoints.convert("smollm2", dst)


def test_convert_killed_half_way_leaves_no_destination(tmp_path, smollm2):
    dst = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "convert", "smollm2", str(dst), "--max-shard-size", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until shards are being written into the temporary directory
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        if tmps and len(list(tmps[0].glob("*.safetensors"))) >= 3:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("convert never started writing")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dst.exists()


def test_direct_to_mesh_loading_equals_normal_loading(smollm2, devices):
    mesh = sharding.mesh_for("tp", 8, devices=devices)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = lift_checkpoint(checkpoints.smollm2_dir(), mesh, "tp", fallback="replicate")
        normal = lift(smollm2.model, mesh, "tp", fallback="replicate")
    assert set(direct.weights) == set(normal.weights)
    gate = direct.weight("model.layers.3.mlp.gate_proj.weight")
    assert gate.addressable_shards[0].data.shape == (1536 // 8, 576)
    ids = np.asarray([smollm2.tokenizer.encode("The capital of France is")])
    assert np.array_equal(np.asarray(direct.forward(ids)), np.asarray(normal.forward(ids)))


def test_sliced_reads_equal_the_safetensors_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(6, 4, generator=g), "bf16": torch.randn(6, 4, generator=g).to(torch.bfloat16),
               "i8": torch.randint(-127, 127, (5, 3), dtype=torch.int8, generator=g), "scalar": torch.tensor(3.5),
               "vec": torch.randn(7, generator=g)}  # fmt: skip
    save_file(tensors, tmp_path / "model.safetensors")
    source = checkpoints.TensorSource([tmp_path / "model.safetensors"])
    for name, t in tensors.items():
        indices = [()] if t.ndim == 0 else [(), (slice(2, 4),), (slice(0, t.shape[0], 2),)]
        if t.ndim == 2:
            indices += [(slice(None), slice(1, 3)), (slice(1, 5), slice(0, 2))]
        for index in indices:
            got = source.read(name, index)
            want = t[index] if index else t
            assert got.shape == tuple(want.shape), (name, index)
            assert np.array_equal(got.astype(np.float64), want.double().numpy()), (name, index)


LOAD_PEAK = """
import json, sys
sys.path.insert(0, {root!r})
import jax, sharding, transformers
from bridge import checkpoints
from bridge.lift import lift_checkpoint
from bridge.torchax_compat import import_torchax
import_torchax(), transformers.AutoConfig  # libraries loaded before measuring: only the load counts
def vm(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
path = checkpoints.smollm2_dir()
mesh = sharding.mesh_for("replicated", 1)
before = vm("VmRSS")
lifted = lift_checkpoint(path, mesh, "replicated")
jax.block_until_ready(list(lifted.weights.values()))
print(json.dumps({{"growth": vm("VmHWM") - before, "checkpoint": sum(f.stat().st_size for f in path.glob("*.safetensors"))}}))
"""


def test_direct_to_mesh_peak_memory_stays_under_1_5x_the_checkpoint(smollm2):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-c", LOAD_PEAK.format(root=root)], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # The placed weights themselves are 1.0x (one CPU device lives in host memory).
    assert r["growth"] < 1.5 * r["checkpoint"], f"peak grew by {r['growth'] / r['checkpoint']:.2f}x the checkpoint"


def test_neox_checkpoint_with_old_head_name_loads(tmp_path):
    model = model_torch.from_preset("tiny-neox")
    hc = transformers.GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=8, max_position_embeddings=256)  # fmt: skip
    d = tmp_path / "neox"
    d.mkdir()
    hc.save_pretrained(d)
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in model.state_dict().items()}
    save_file(state, d / "model.safetensors")
    loaded = checkpoints.load(str(d), with_tokenizer=False)
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)


# ---------------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------------
def test_int8_smollm2_bytes_and_greedy_tokens(devices):
    fp = checkpoints.load("smollm2")
    q = checkpoints.load("smollm2", quantize="int8")
    mesh = sharding.mesh_for("tp", 1, devices=devices)
    lf, lq = lift(fp.model, mesh, "tp"), lift(q.model, mesh, "tp")
    fp_bytes = sum(a.nbytes for a in lf.weights.values())
    q_bytes = sum(a.nbytes for a in lq.weights.values())
    assert q_bytes <= 0.27 * fp_bytes, q_bytes / fp_bytes
    from bridge.generate import Generator

    gf, gq = Generator(lf, fp.tokenizer), Generator(lq, q.tokenizer)
    ids = gf.encode("What is the capital of France?", chat=True)
    a = gf.generate_ids([ids], 16).token_ids[0]
    b = gq.generate_ids([ids], 16).token_ids[0]
    assert a[:16] == b[:16]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-grok", "tiny-neox"])
def test_int8_tp_sharded_equals_int8_unsharded(preset, devices):
    torch.manual_seed(0)
    model = model_torch.from_preset(preset).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    quantize_int8(model)
    ids = random_ids(256, (2, 12)).numpy()
    ref = lift(model, sharding.mesh_for("replicated", 1, devices=devices), "replicated").forward(ids)
    lifted = lift(model, sharding.mesh_for("tp", 8, devices=devices), "tp")
    scales = [k for k in lifted.placements if k.endswith("scale")]
    assert scales
    for k in scales:  # every scale sits with its weight's output dim
        wname = k[: -len("scale")] + "weight" if not k.endswith("_scale") else k[: -len("_scale")]
        if wname in lifted.placements:
            dim0 = lambda spec: spec[0] if len(spec) else None  # noqa: E731
            assert dim0(lifted.placements[k].spec) == dim0(lifted.placements[wname].spec), k
    assert max_rel(lifted.forward(ids), ref) < RTOL


def test_mixtral_as_the_hub_stores_it_opens_in_our_rewrite(tmp_path, devices):
    """transformers saves Mixtral as every Hub checkpoint stores it, one ``w1``/``w2``/``w3`` per expert
    under ``block_sparse_moe``, while our rewrite keeps transformers' fused experts (``gate_up_proj``
    [E, 2F, H] = [w1; w3], ``down_proj`` = w2): both loaders convert it by transformers' own table.
    The host loader's tensors equal transformers' loaded model's; a slice across the w1/w3 seam reads
    what the whole tensor holds; greedy tokens equal transformers' on 1 device, with the experts
    over 2 devices (ep) and under tp on 4 (each device's slice of gate_up_proj read from both)."""
    from safetensors import safe_open

    from bridge.generate import Generator
    from bridge.models import open_model
    from model_torch.llama import LlamaForCausalLM

    hc = transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=4, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(hc).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in f.keys()
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    loaded = checkpoints.load(str(tmp_path), with_tokenizer=False)
    assert isinstance(loaded.model, LlamaForCausalLM)
    want = hf.state_dict()
    for name, t in loaded.model.state_dict().items():
        assert torch.equal(t, want[name]), name
    stored = checkpoints.SafetensorsWeights(tmp_path, (), "mixtral")
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert np.array_equal(stored.read(name, (slice(1, 3), slice(90, 100))), want[name][1:3, 90:100].numpy())
    prompt = [5, 17, 42, 99, 7, 63, 11, 250]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 8:].tolist()
    for n, scheme in [(1, "replicated"), (2, "ep"), (4, "tp")]:
        lifted = open_model(str(tmp_path), devices=devices[:n], scheme=scheme, with_tokenizer=False)
        assert isinstance(lifted.model, LlamaForCausalLM)
        assert Generator(lifted, stop_at_eos=False).generate_ids([prompt], 8).token_ids[0] == ref, (n, scheme)
