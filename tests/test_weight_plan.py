"""One weight plan, every path (issue 28): one process, two processes via ``launch``, ``plan
--checkpoint`` and ``compare`` place a model the same way, so they give the same greedy tokens as one
device wherever they run it, and ``plan`` accepts what ``generate`` accepts.

Models, made as users make them (``save_pretrained``, no tokenizer): a Llama with 8 query / 2 kv
heads on tp 8 (kv heads repeated 4x), a GPT-2 with vocabulary 509 (padded on tp 4) and a fused
``c_attn`` (split), the Llama in int8, and each stack scanned and unrolled."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import sharding
from bridge import weight_plan
from bridge.models import open_model

IDS = [1, 2, 3, 4, 5]
NEW = 6


@pytest.fixture(scope="module")
def llama82(tmp_path_factory):
    import transformers as T

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "llama82"
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=517, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
                       ).save_pretrained(path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    import transformers as T

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "gpt2"
    # initializer_range 0.2: at GPT-2's 0.02 a model this small answers one token over and over,
    # which would hide a wrong placement.
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=509, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                   initializer_range=0.2)).save_pretrained(path)
    return path


def tokens(lifted) -> list[int]:
    from bridge.generate import Generator

    return Generator(lifted, stop_at_eos=False).generate_ids([IDS], NEW).token_ids[0]


@pytest.fixture(scope="module")
def one_device(llama82, gpt2, devices):  # devices first: jax starts with all 8
    """Greedy tokens of every case on one device: the reference."""
    return {
        "llama82": tokens(open_model(str(llama82), devices=1, with_tokenizer=False, scan_layers=False)),
        "llama82-int8": tokens(open_model(str(llama82), devices=1, with_tokenizer=False, quantize="int8")),
        "gpt2": tokens(open_model(str(gpt2), devices=1, with_tokenizer=False)),
    }


def test_the_plan_names_every_transform(llama82):
    from bridge import checkpoints

    model = checkpoints.load(str(llama82), with_tokenizer=False).model
    plan = weight_plan.plan_weights(model, {"model": 8}, "tp", scan_layers=True)
    assert plan.kv_head_copies == 4
    k = plan.weights["model.layers.*.self_attn.k_proj.weight"]
    assert k.transforms == (weight_plan.REPEAT_KV_HEADS, weight_plan.STACK_LAYERS)
    assert k.sources == ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.weight")
    assert k.placement.shape == (2, 2 * 4 * 16, 128) and k.placement.spec == sharding.P(None, "model")
    q = plan.weights["model.layers.*.self_attn.q_proj.weight"]
    assert q.transforms == (weight_plan.STACK_LAYERS,)
    head = plan.weights["lm_head.weight"]  # 517 rows padded to 520 over 8 devices
    assert head.transforms == (weight_plan.PAD_VOCAB,) and head.placement.shape == (520, 128)
    unrolled = weight_plan.plan_weights(model, {"model": 8}, "tp")
    assert unrolled.weights["model.layers.1.self_attn.v_proj.weight"].transforms == (weight_plan.REPEAT_KV_HEADS,)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_direct_loading_places_what_lifting_places(llama82, devices, scan_layers):
    """The per-process loader (each device's slice read from the safetensors) and the host path
    (load the module, lift it) execute one plan: the same arrays, the same placements. Before the
    plan the direct loader did not repeat kv heads and refused this model on tp 8."""
    from bridge import checkpoints
    from bridge.lift import lift, lift_checkpoint

    mesh = sharding.mesh_for("tp", 8, devices=devices)
    direct = lift_checkpoint(llama82, mesh, "tp", scan_layers=scan_layers)
    lifted = lift(checkpoints.load(str(llama82), with_tokenizer=False).model, mesh, "tp", scan_layers=scan_layers)
    assert direct.kv_head_copies == lifted.kv_head_copies == 4
    assert direct.placements == lifted.placements
    for name, w in lifted.weights.items():
        np.testing.assert_array_equal(np.asarray(direct.weights[name]), np.asarray(w), err_msg=name)


@pytest.mark.parametrize("case,devices_n,scan_layers", [
    ("llama82", 8, False), ("llama82", 8, True), ("llama82-int8", 8, False), ("gpt2", 4, False)])  # fmt: skip
def test_one_process_matches_one_device(case, devices_n, scan_layers, llama82, gpt2, one_device):
    path = {"llama82": llama82, "llama82-int8": llama82, "gpt2": gpt2}[case]
    lifted = open_model(str(path), devices=devices_n, scheme="tp", with_tokenizer=False, scan_layers=scan_layers,
                        quantize="int8" if case.endswith("int8") else "none")  # fmt: skip
    assert not any(p.fallback for p in lifted.placements.values())  # every tensor split as the scheme says
    assert tokens(lifted) == one_device[case]


def bridge_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("case,devices_n,extra", [
    ("llama82", 4, []), ("llama82", 4, ["--no-scan-layers"]), ("llama82-int8", 4, ["--quantize", "int8"]),
    ("gpt2", 2, [])])  # fmt: skip
def test_two_processes_match_one_device(case, devices_n, extra, llama82, gpt2, one_device):
    """The issue's example: ``launch`` refused the Llama (the per-process loader did not repeat kv
    heads); scanned, as ``generate`` runs it by default. The int8 Llama and GPT-2 (transformers'
    class, fused ``c_attn`` split, vocab padded) load on the host in each process and are placed
    by the same plan."""
    path = {"llama82": llama82, "llama82-int8": llama82, "gpt2": gpt2}[case]
    out = bridge_cli("launch", "--processes", "2", "--devices-per-process", str(devices_n), "--", "generate",
                     "--checkpoint", str(path), "--input-ids", ",".join(map(str, IDS)), "--max-new-tokens", str(NEW),
                     "--scheme", "tp", "--json", *extra)  # fmt: skip
    assert json.loads(out.strip().splitlines()[-1])["token_ids"] == one_device[case]


@pytest.mark.parametrize("case,devices_n,extra,scanned", [
    ("llama82", 8, ["--dtype", "float32", "--no-scan-layers"], False), ("llama82", 8, ["--dtype", "int8"], None),
    ("llama82", 8, ["--dtype", "float32", "--scan-layers"], True), ("llama82", 8, ["--dtype", "float32"], True),
    ("gpt2", 4, ["--dtype", "float32"], True), ("gpt2", 4, ["--dtype", "float32", "--no-scan-layers"], False)])  # fmt: skip
def test_plan_accepts_what_generate_accepts(case, devices_n, extra, scanned, llama82, gpt2, capsys):
    """plan's default layout is generate's: scanned where the model can scan, 16-bit floats on CPU
    only where the CPU kernels slice their stack (None: plan's int8 is int8 over bf16); GPT-2 runs
    through transformers' class, scanned too."""
    from bridge import cli, cpu_kernels

    scanned = cpu_kernels.available() if scanned is None else scanned

    path = {"llama82": llama82, "gpt2": gpt2}[case]
    assert cli.main(["plan", "--checkpoint", str(path), "--devices", str(devices_n), "--scheme", "tp", *extra,
                     "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["param_bytes_per_device"] > 0 and not result["fallbacks"]  # every tensor split as planned
    assert result["scan_layers"] == scanned


@pytest.mark.parametrize("case,devices_n,scan_layers", [
    ("llama82", 8, True), ("llama82-int8", 8, False), ("gpt2", 4, False)])  # fmt: skip
def test_compare_runs_the_planned_model(case, devices_n, scan_layers, llama82, gpt2, devices):
    """``compare`` against its one-device reference (the same weights replicated): the Llama scanned
    on tp 8 (kv heads repeated), the int8 Llama unrolled, GPT-2 through transformers' class on tp 4
    (fused ``c_attn`` split, vocabulary padded). fp32 forward logits within 1e-4 relative."""
    from bridge import experiments

    path = {"llama82": llama82, "llama82-int8": llama82, "gpt2": gpt2}[case]
    opened = open_model(str(path), devices=1, scheme="replicated", with_tokenizer=False,
                        quantize="int8" if case.endswith("int8") else "none")  # fmt: skip
    rows = experiments.compare(opened, ["tp"], devices[:devices_n], batch=2, seq=8, repeats=1, scan_layers=scan_layers)
    assert rows[0].status == "ok", rows[0].status
    assert rows[0].max_rel_diff < 1e-4
