"""Weights made or converted tensor by tensor on their way onto the mesh (issue 30): ``--quantize int8``
quantizes each tensor as it is read, a preset makes each random tensor where it lives, and a model
whose weights cannot fit is refused before anything is placed. Each in-place path is held against the
host path (load the whole module, then lift): the same arrays."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import sharding
from bridge import checkpoints
from bridge.errors import DoesNotFit
from bridge.lift import lift
from bridge.models import open_model


@pytest.fixture(scope="module")
def llama82(tmp_path_factory):
    import transformers as T

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "llama82"
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=517, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                                     torch_dtype="bfloat16")).to(torch.bfloat16).save_pretrained(path)  # fmt: skip
    return path


def same_arrays(a, b):
    assert a.placements == b.placements
    for name, w in b.weights.items():
        np.testing.assert_array_equal(np.asarray(a.weights[name]), np.asarray(w), err_msg=name)


@pytest.mark.parametrize("n,scheme", [(1, "replicated"), (8, "tp")])
def test_int8_quantized_while_loading_equals_quantizing_the_loaded_model(llama82, devices, n, scheme):
    """bf16 safetensors, placed as f32 int8 scales: each tensor read, quantized (from the model's
    dtype, as ``quantize_int8`` does on a loaded module) and placed before the next."""
    opened = open_model(str(llama82), devices=n, scheme=scheme, quantize="int8", with_tokenizer=False)
    assert all(t.is_meta for t in opened.model.state_dict().values())  # never held on the host
    assert isinstance(opened.stored, checkpoints.QuantizingWeights)
    host = checkpoints.load(str(llama82), with_tokenizer=False, quantize="int8").model
    same_arrays(opened, lift(host, sharding.mesh_for(scheme, n, devices=devices[:n]), scheme))


def test_a_preset_is_made_in_place_and_equals_the_host_build(devices):
    opened = open_model("tiny-llama", devices=2, scheme="tp", with_tokenizer=False)
    assert isinstance(opened.stored, checkpoints.RandomWeights)
    host = checkpoints.load("tiny-llama", with_tokenizer=False).model
    same_arrays(opened, lift(host, sharding.mesh_for("tp", 2, devices=devices[:2]), "tp"))


def test_weights_that_cannot_fit_are_refused_before_placing(monkeypatch, devices):
    import psutil

    class Tight:
        available = 1 << 20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    with pytest.raises(DoesNotFit, match=r"the weights need .* GiB .* but this host has 0\.0 GiB available for its 1 CPU"):
        open_model("tiny-llama", devices=1, with_tokenizer=False)


def test_a_kv_cache_that_cannot_fit_is_refused_before_compiling(monkeypatch, devices):
    import psutil

    from bridge.generate import Generator

    gen = Generator(open_model("tiny-llama", devices=1, with_tokenizer=False), after_request=())

    class Tight:
        available = 1 << 10

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    with pytest.raises(DoesNotFit, match=r"a KV cache for 2 row\(s\) x \d+ positions needs"):
        gen.generate_ids([[1, 2, 3], [4, 5, 6]], 4)
    assert not gen._compiled  # refused before anything compiled


def test_the_8b_preset_that_cannot_fit_is_refused_in_seconds():
    """Llama-3-8B in float32 replicated on 8 CPU devices is 8 copies of 29.9 GiB in this host's
    memory: one line, exit 2, nothing built (no machine that runs this suite has 240 GiB free)."""
    proc = subprocess.run([sys.executable, "-m", "bridge", "generate", "--checkpoint", "llama-3-8b", "--input-ids", "1,2",
                           "--devices", "8", "--scheme", "replicated"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "the weights need 239.3 GiB (29.92 GiB on each of 8" in lines[0], lines
    assert "--quantize int8" in lines[0]
