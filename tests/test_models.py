"""model_torch against transformers' own classes (identical weights), in torch eager and lifted to JAX."""


import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import model_torch
from bridge.lift import extract
from conftest import RTOL, max_rel, random_ids
from model_torch.grok import GrokConfig, GrokForCausalLM
from model_torch.llama import LlamaConfig, LlamaForCausalLM
from model_torch.neox import GPTNeoXConfig, GPTNeoXForCausalLM


def jax_logits(model, ids: torch.Tensor) -> np.ndarray:
    weights, fn = extract(model)
    f = jax.jit(lambda w, i: fn(w, (i,))[0])
    return np.asarray(f(weights, jax.numpy.asarray(ids.numpy())))


def check_parity(hf_model, ours, ids):
    ours.load_state_dict(hf_model.state_dict(), strict=True)
    ours.eval()
    with torch.no_grad():
        ref = hf_model(ids).logits
        eager, cache = ours(ids)
    assert cache is None
    assert max_rel(eager, ref) < RTOL, "torch eager differs from transformers"
    assert max_rel(jax_logits(ours, ids), ref) < RTOL, "lifted JAX differs from transformers"


LLAMA_CASES = {
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "gqa-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mha-rope-scaling": dict(
        num_key_value_heads=8,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_matches_transformers(case):
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        max_position_embeddings=256, **LLAMA_CASES[case],
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hc).eval()
    ours = LlamaForCausalLM(LlamaConfig.from_hf(hc))
    if case == "mha-rope-scaling":
        assert ours.config.rope_scaling["rope_type"] == "llama3"
    check_parity(hf, ours, random_ids(256, (2, 48)))


def test_qwen2_attention_bias_matches_transformers():
    torch.manual_seed(0)
    hc = transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    hf = transformers.Qwen2ForCausalLM(hc).eval()
    with torch.no_grad():  # HF zero-inits biases: make them count
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    ours = LlamaForCausalLM(LlamaConfig.from_hf(hc))
    assert ours.config.qkv_bias and not ours.config.o_bias
    check_parity(hf, ours, random_ids(256, (2, 24)))


@pytest.mark.parametrize("parallel", [True, False])
def test_neox_matches_transformers(parallel):
    torch.manual_seed(0)
    hc = transformers.GPTNeoXConfig(
        vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        rotary_pct=0.25, use_parallel_residual=parallel, max_position_embeddings=256,
    )  # fmt: skip
    hf = transformers.GPTNeoXForCausalLM(hc).eval()
    ours = GPTNeoXForCausalLM(GPTNeoXConfig.from_hf(hc))
    assert ours.config.rotary_dim == 4 and ours.config.use_parallel_residual == parallel
    check_parity(hf, ours, random_ids(256, (2, 40)))


def test_mixtral_moe_matches_transformers():
    torch.manual_seed(0)
    hc = transformers.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
    )  # fmt: skip
    hf = transformers.MixtralForCausalLM(hc).eval()
    ours = LlamaForCausalLM(LlamaConfig.from_hf(hc))
    assert ours.model.layers[0].mlp.routing == "topk_softmax"
    check_parity(hf, ours, random_ids(256, (2, 32)))


# ---------------------------------------------------------------------------------------------------
# Grok-1: against a reference written here with plain torch ops, per REFERENCE.md section 2
# ---------------------------------------------------------------------------------------------------
def grok_reference(sd: dict, c: GrokConfig, ids: torch.Tensor) -> torch.Tensor:
    def rms(x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    def rope(x, pos):  # x [B, T, H, D], rotate-half convention
        d = x.shape[-1]
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2).float() / d))
        ang = pos[:, None].float() * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos()[None, :, None], torch.cat([ang, ang], -1).sin()[None, :, None]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    b, t = ids.shape
    hd, hq, hk = c.head_dim, c.num_heads, c.num_kv_heads
    emb = sd["model.embed_tokens.weight"]
    h = emb[ids] * c.embedding_multiplier_scale
    pos = torch.arange(t)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "pre_attn_norm.weight"])
        q = rope((x @ sd[p + "self_attn.q_proj.weight"].T).view(b, t, hq, hd), pos)
        k = rope((x @ sd[p + "self_attn.k_proj.weight"].T).view(b, t, hk, hd), pos)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(b, t, hk, hd)
        k = k.repeat_interleave(hq // hk, dim=2)
        v = v.repeat_interleave(hq // hk, dim=2)
        logits = torch.einsum("bthd,bshd->bhts", q, k).float() * c.attn_output_multiplier
        logits = 30.0 * torch.tanh(logits / 30.0)
        logits = torch.where(causal, logits, torch.tensor(-1e30))
        a = torch.einsum("bhts,bshd->bthd", logits.softmax(-1), v).reshape(b, t, hq * hd)
        h = h + rms(a @ sd[p + "self_attn.o_proj.weight"].T, sd[p + "post_attn_norm.weight"])
        x = rms(h, sd[p + "pre_moe_norm.weight"]).reshape(b * t, -1)
        probs = (x.float() @ sd[p + "mlp.gate.weight"].float().T).softmax(-1)
        top_p, top_i = probs.topk(2, dim=-1)  # top-2 of the full softmax, NOT renormalised
        out = torch.zeros_like(x)
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        for n in range(x.shape[0]):
            for j in range(2):
                e = int(top_i[n, j])
                g, u = (gate_up[e] @ x[n]).chunk(2)
                out[n] += top_p[n, j] * (down[e] @ (F.gelu(g) * u))
        h = h + rms(out.view(b, t, -1), sd[p + "post_moe_norm.weight"])
    return (rms(h, sd["model.norm.weight"]) @ emb.T) * c.output_multiplier_scale


def tiny_grok(seed=0) -> GrokForCausalLM:
    torch.manual_seed(seed)
    model = model_torch.from_preset("tiny-grok").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "gate.weight" in name else 0.1)
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


def test_grok_matches_reference_semantics():
    model = tiny_grok()
    c = model.config
    ids = random_ids(c.vocab_size, (2, 12))
    with torch.no_grad():
        ref = grok_reference(dict(model.state_dict()), c, ids)
        eager, _ = model(ids)
    assert max_rel(eager, ref) < RTOL
    assert max_rel(jax_logits(model, ids), ref) < RTOL


def test_grok_routing_is_top2_of_full_softmax_not_renormalised():
    moe = tiny_grok().model.layers[0].mlp
    x = torch.randn(5, moe.gate.weight.shape[1])
    w = moe.combine_weights(x)
    probs = (x @ moe.gate.weight.T).softmax(-1)
    top = probs.topk(2, -1)
    assert ((w > 0).sum(-1) == 2).all()
    assert torch.allclose(w.gather(1, top.indices), top.values)
    assert (w.sum(-1) < 1 - 1e-3).all(), "weights were renormalised over the top 2"


def test_grok_softcap_and_multipliers_matter():
    model = tiny_grok()
    with torch.no_grad():  # attention logits well past the cap of 30, so the cap changes them
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(300.0)
    ids = random_ids(model.config.vocab_size, (1, 8))
    with torch.no_grad():
        base, _ = model(ids)
        for field, value in [("attn_softcap", 1e9), ("embedding_multiplier_scale", 1.0), ("output_multiplier_scale", 1.0)]:
            old = getattr(model.config, field)
            setattr(model.config, field, value)
            changed, _ = model(ids)
            setattr(model.config, field, old)
            assert max_rel(changed, base) > 1e-3, f"{field} has no effect"


def test_grok1_preset_has_314b_parameters_without_allocating():
    with torch.device("meta"):
        model = model_torch.from_preset("grok-1")
    n = model_torch.common.count_parameters(model)
    assert abs(n - 314e9) / 314e9 < 0.01, n
    assert all(p.is_meta for p in model.parameters())
    c = model.config
    assert (c.num_layers, c.num_experts, c.num_heads, c.num_kv_heads, c.intermediate_size) == (64, 8, 48, 8, 32768)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 2 * 32768, 6144)


# ---------------------------------------------------------------------------------------------------
# KV cache: prefill n tokens then k single-token steps == one forward of n + k
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-llama-3", "tiny-smollm2", "tiny-mixtral", "tiny-neox", "tiny-pythia", "tiny-grok"])
def test_kv_cache_consistency(preset):
    torch.manual_seed(0)
    model = tiny_grok() if preset == "tiny-grok" else model_torch.from_preset(preset).eval()
    n, k = 10, 6
    ids = random_ids(model.config.vocab_size, (2, n + k), seed=1)
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.init_kv_cache(2, 32)
        logits, cache = model(ids[:, :n], kv_cache=cache)
        steps = [logits]
        for t in range(n, n + k):
            logits, cache = model(ids[:, t : t + 1], kv_cache=cache, cache_position=torch.tensor([t]))
            steps.append(logits)
    assert max_rel(torch.cat(steps, 1), full) < RTOL

    # The same through the lifted JAX function, with the cache passed in and returned.
    weights, fn = extract(model)
    jcache = jax.tree.map(lambda t: jax.numpy.asarray(t.numpy()), model.init_kv_cache(2, 32))
    step = jax.jit(lambda w, i, c, p: fn(w, (i,), dict(kv_cache=c, cache_position=p)))
    j = jax.numpy.asarray(ids.numpy())
    out, jcache = step(weights, j[:, :n], jcache, jax.numpy.arange(n))
    outs = [np.asarray(out)]
    for t in range(n, n + k):
        out, jcache = step(weights, j[:, t : t + 1], jcache, jax.numpy.asarray([t]))
        outs.append(np.asarray(out))
    assert max_rel(np.concatenate(outs, 1), full) < RTOL


def test_padded_batch_matches_unpadded_rows():
    """Left padding + key mask + per-row positions give each row its own unpadded logits."""
    model = model_torch.from_preset("tiny-llama").eval()
    a, b = random_ids(256, (1, 7), 2), random_ids(256, (1, 4), 3)
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0], ids[1, 3:] = a[0], b[0]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    pos = torch.tensor([list(range(7)), [0, 0, 0, 0, 1, 2, 3]])
    with torch.no_grad():
        batched, _ = model(ids, positions=pos, attention_mask=mask)
        ra, _ = model(a)
        rb, _ = model(b)
    assert max_rel(batched[0], ra[0]) < RTOL and max_rel(batched[1, 3:], rb[0]) < RTOL


def test_smollm2_model_torch_matches_transformers(smollm2):
    from bridge import checkpoints

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints.smollm2_dir(), dtype=torch.float32).eval()
    assert type(smollm2.model) is LlamaForCausalLM
    ids = torch.tensor([smollm2.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        ref = hf(ids).logits
        ours, _ = smollm2.model(ids)
    assert max_rel(ours, ref) < RTOL
    assert int(ours[0, -1].argmax()) == int(ref[0, -1].argmax())


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-neox"])
def test_long_prefill_in_query_blocks_equals_one_block(preset, monkeypatch):
    """A prefill longer than the SDPA lowering's QUERY_CHUNK attends block by block (bounded
    memory); with blocks of 4 queries over a 13-token prompt, with and without a cache and with left
    padding, the lifted logits equal eager torch's single-block computation."""
    from bridge import lowerings

    torch.manual_seed(0)
    model = model_torch.from_preset(preset).eval()
    ids = random_ids(model.config.vocab_size, (2, 13), seed=3)
    key_mask = torch.ones(2, 32, dtype=torch.int64)
    key_mask[1, :5] = 0  # row 1 left-padded by 5
    positions = torch.stack([torch.arange(13), (torch.arange(13) - 5).clamp(min=0)])
    with torch.no_grad():
        whole = model(ids)[0], model(ids, positions=positions, kv_cache=model.init_kv_cache(2, 32), attention_mask=key_mask)[0]
    monkeypatch.setattr(lowerings, "QUERY_CHUNK", 4)
    weights, fn = extract(model)
    j = lambda t: jax.numpy.asarray(t.numpy())  # noqa: E731
    cache = jax.tree.map(j, model.init_kv_cache(2, 32))
    blocks = (np.asarray(jax.jit(lambda w, i: fn(w, (i,))[0])(weights, j(ids))),
              np.asarray(jax.jit(lambda w, i, p, c, m: fn(w, (i,), dict(positions=p, kv_cache=c, attention_mask=m))[0])(
                  weights, j(ids), j(positions), cache, j(key_mask))))  # fmt: skip
    assert max_rel(blocks[0], whole[0]) < RTOL
    assert max_rel(blocks[1][1, 5:], whole[1][1, 5:]) < RTOL and max_rel(blocks[1][0], whole[1][0]) < RTOL


def test_mistral_sliding_window_matches_transformers():
    """A prompt longer than the window: model_torch's Mistral (windowed masks) gives transformers'
    greedy tokens through prefill + decode steps, in eager torch and lifted."""
    cfg = transformers.MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                     max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(cfg).eval()
    cls, config = model_torch.config_from_hf(cfg)
    assert config.sliding_window == 6
    ours = cls(config).eval()
    ids = random_ids(256, (1, 14), seed=2)
    check_parity(hf, ours, ids)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 14:].tolist()
        cache = ours.init_kv_cache(1, 32)
        logits, cache = ours(ids, kv_cache=cache)
        toks = [int(logits[0, -1].argmax())]
        for t in range(14, 25):
            logits, cache = ours(torch.tensor([[toks[-1]]]), kv_cache=cache, cache_position=torch.tensor([t]))
            toks.append(int(logits[0, -1].argmax()))
    assert toks == ref
