"""Grok-1 (xai-org/grok-1): 314B-parameter MoE, 8 experts top-2, written as a plain torch module.

Per layer (a norm before and after each sub-block)::

    h = x + post_attn_norm(attn(pre_attn_norm(x)))
    h = h + post_moe_norm(moe(pre_moe_norm(h)))

Attention logits are fp32, multiplied by ``attn_output_multiplier`` (in place of 1/sqrt(d)), soft-capped
``30 * tanh(s / 30)``. The router is fp32 ``x @ w`` -> softmax over all experts -> top 2, and the two
probabilities weight the experts' outputs as they are (not renormalised). Experts are GELU-gated:
``down(gelu(gate(x)) * up(x))``, stored stacked as ``mlp.experts.gate_up_proj`` [E, 2F, H] and
``mlp.experts.down_proj`` [E, H, F] so a sharding rule can place the expert dim. Embeddings are tied:
``embed(tokens) * embedding_multiplier_scale`` in, ``norm(h) @ embed.T * output_multiplier_scale`` out.
Names follow transformers' Llama/Mixtral layout (``model.layers.0.self_attn.q_proj.weight``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from .common import (
    CausalLM,
    KVCache,
    MoE,
    RMSNorm,
    TiedHead,
    apply_rope,
    attend,
    head_layout_for,
)


def ffn_size(hidden: int, widening_factor: float) -> int:
    """Grok-1's expert width: int(widening * hidden) * 2 // 3, rounded up to a multiple of 8."""
    size = int(widening_factor * hidden) * 2 // 3
    return size + (-size) % 8


@dataclasses.dataclass
class GrokConfig:
    vocab_size: int = 128 * 1024
    hidden_size: int = 6144
    widening_factor: float = 8.0
    intermediate_size: Optional[int] = None  # derived from widening_factor when None
    num_layers: int = 64
    num_heads: int = 48
    num_kv_heads: int = 8
    head_dim: int = 128
    num_experts: int = 8
    num_experts_per_tok: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attn_output_multiplier: float = 0.08838834764831845
    attn_softcap: float = 30.0
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    max_position_embeddings: int = 8192
    routing: str = "softmax_topk"
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    pad_token_id: int = 0
    model_type: str = "grok"

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = ffn_size(self.hidden_size, self.widening_factor)

    @classmethod
    def from_hf(cls, hf) -> "GrokConfig":
        """From a config.json with ``model_type: grok`` (the community HF port's field names)."""
        g = lambda name, default: getattr(hf, name, default)  # noqa: E731
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=g("intermediate_size", None),
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=g("num_key_value_heads", hf.num_attention_heads),
            head_dim=g("head_dim", hf.hidden_size // hf.num_attention_heads),
            num_experts=g("num_experts", g("num_local_experts", 8)),
            num_experts_per_tok=g("num_experts_per_tok", 2),
            rope_theta=float(g("rope_theta", 10000.0)),
            rms_norm_eps=g("rms_norm_eps", 1e-5),
            attn_output_multiplier=g("attn_output_multiplier", 0.08838834764831845),
            attn_softcap=g("max_attn_value", 30.0),
            embedding_multiplier_scale=g("embedding_multiplier_scale", 78.38367176906169),
            output_multiplier_scale=g("output_multiplier_scale", 0.5773502691896257),
            max_position_embeddings=g("max_position_embeddings", 8192),
        )


PRESETS: dict[str, GrokConfig] = {
    "grok-1": GrokConfig(),
    "tiny-grok": GrokConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_heads=16, num_kv_heads=8, head_dim=8,
        num_experts=8, num_experts_per_tok=2, attn_output_multiplier=8**-0.5, max_position_embeddings=256,
    ),
}  # fmt: skip


class Attention(nn.Module):
    def __init__(self, c: GrokConfig, layer_idx: int):
        super().__init__()
        self.c, self.layer_idx = c, layer_idx
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache, cache_position):
        b, t, _ = x.shape
        d = self.c.head_dim
        q = self.q_proj(x).view(b, t, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, mask, self.c.attn_output_multiplier, cache, self.layer_idx, cache_position,
                     softcap=self.c.attn_softcap)  # fmt: skip
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, c: GrokConfig, layer_idx: int):
        super().__init__()
        self.pre_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer_idx)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_moe_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MoE(c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok, "gelu", c.routing)
        self.post_moe_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, cache_position):
        x = x + self.post_attn_norm(self.self_attn(self.pre_attn_norm(x), cos, sin, mask, cache, cache_position))
        return x + self.post_moe_norm(self.mlp(self.pre_moe_norm(x)))


class GrokModel(nn.Module):
    def __init__(self, c: GrokConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class GrokForCausalLM(CausalLM):
    DECODER_LAYERS = "model.layers"
    LAYER_BLOCKS = ("self_attn", "mlp")
    def __init__(self, config: GrokConfig):
        super().__init__()
        self.config = config
        self.model = GrokModel(config)
        self.lm_head = TiedHead(self.model.embed_tokens)  # grok-1 ties its head to the embedding

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        cache_position: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ):
        c = self.config
        x = self.model.embed_tokens(input_ids) * c.embedding_multiplier_scale
        x, new_cache = self.run_layers(self.model.layers, x, positions, kv_cache, cache_position, attention_mask)
        logits = self.lm_head(self.model.norm(x)) * c.output_multiplier_scale
        return logits, new_cache

    def head_layout(self):
        return head_layout_for(["q_proj", "k_proj", "v_proj"], ["o_proj"], self.config.head_dim)

    def kv_projections(self):
        return [(r"\.(k_proj|v_proj)\.(weight|bias|scale)$", self.config.head_dim)]
