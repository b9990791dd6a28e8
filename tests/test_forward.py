"""The core flow: torch module -> extract_jax -> weights on a mesh by rule table -> jit -> logits."""

import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import model_torch
import sharding
from bridge.lift import lift
from conftest import RTOL, max_rel, random_ids


def eager_logits(model, ids):
    with torch.no_grad():
        return model(ids)[0].numpy()


@pytest.mark.parametrize("n_devices", [1, 8])
def test_tiny_llama_lifted_matches_eager(devices, n_devices):
    model = model_torch.from_preset("tiny-llama").eval()
    ids = random_ids(256, (2, 24))
    mesh = sharding.mesh_for("tp", n_devices, devices=devices)
    lifted = lift(model, mesh, "tp")
    assert max_rel(lifted.forward(ids.numpy()), eager_logits(model, ids)) < RTOL


def test_tp_weights_really_are_sharded(devices):
    model = model_torch.from_preset("tiny-llama").eval()  # 16 q / 8 kv heads of 8, hidden 128, mlp 256
    lifted = lift(model, sharding.mesh_for("tp", 8, devices=devices), "tp")
    expect = {
        "model.layers.0.self_attn.q_proj.weight": (P("model"), (16, 128)),
        "model.layers.0.self_attn.k_proj.weight": (P("model"), (8, 128)),
        "model.layers.1.mlp.gate_proj.weight": (P("model"), (32, 128)),
        "model.layers.0.self_attn.o_proj.weight": (P(None, "model"), (128, 16)),
        "model.layers.1.mlp.down_proj.weight": (P(None, "model"), (128, 32)),
        "model.embed_tokens.weight": (P("model", None), (32, 128)),
        "lm_head.weight": (P("model"), (32, 128)),
        "model.norm.weight": (P(), (128,)),
    }
    for name, (spec, shard_shape) in expect.items():
        arr = lifted.weight(name)  # scanned (the default): its layer's slice of the stacked tensor
        assert arr.sharding.spec == spec, name
        shapes = {s.data.shape for s in arr.addressable_shards}
        assert shapes == {shard_shape}, (name, shapes)
        assert len(arr.addressable_shards) == 8


def test_smollm2_lifted_matches_eager_on_1_and_tp8(smollm2, devices):
    model = smollm2.model
    ids = torch.tensor([smollm2.tokenizer.encode("The capital of France is")])
    ref = eager_logits(model, ids)
    one = lift(model, sharding.mesh_for("tp", 1, devices=devices), "tp")
    assert max_rel(one.forward(ids.numpy()), ref) < RTOL
    with pytest.warns(UserWarning, match="replicated"):
        tp8 = lift(model, sharding.mesh_for("tp", 8, devices=devices), "tp", fallback="replicate")
    out = np.asarray(tp8.forward(ids.numpy()))
    assert max_rel(out, ref) < RTOL
    # The MLPs and embedding really are split 8 ways; attention (9 q / 3 kv heads) is replicated.
    gate = tp8.weight("model.layers.0.mlp.gate_proj.weight")
    assert gate.sharding.spec == P("model") and gate.addressable_shards[0].data.shape == (1536 // 8, 576)
    assert tp8.weights["model.embed_tokens.weight"].addressable_shards[0].data.shape == (49152 // 8, 576)
    q = tp8.placement("model.layers.0.self_attn.q_proj.weight")
    assert q.spec == P() and "heads" in q.fallback
    assert int(out[0, -1].argmax()) == int(ref[0, -1].argmax())
