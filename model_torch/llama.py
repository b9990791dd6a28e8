"""Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2 (attention bias) and Mixtral (MoE MLP).

State-dict names are transformers' (``model.layers.0.self_attn.q_proj.weight``, ...), so a HF
checkpoint loads with ``load_state_dict(strict=True)`` and no renaming.

    forward(input_ids, positions=None, kv_cache=None, cache_position=None, attention_mask=None)
        -> (logits, new_kv_cache)

``kv_cache=None`` is a plain full-sequence forward (new_kv_cache is None). With a cache (see
``init_kv_cache``), keys/values of the ``T`` new tokens are written at columns ``cache_position``
[T] and the returned cache is a new value: nothing is mutated, so the lifted JAX function is pure
and its cache argument can be donated. ``positions`` [B, T] are RoPE positions (they differ from
cache columns under left padding); ``attention_mask`` [B, S] marks real (non-padding) key columns.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    CausalLM,
    KVCache,
    MoE,
    RMSNorm,
    apply_rope,
    attend,
    head_layout_for,
)


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    # Mixtral: num_experts > 0 swaps the MLP for a mixture of experts.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    hidden_act: str = "silu"
    # Mistral: each query sees at most this many keys (itself included); None is full attention.
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    model_type: str = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_hf(cls, hf) -> "LlamaConfig":
        """From a transformers LlamaConfig / MistralConfig / Qwen2Config / MixtralConfig."""
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        model_type = getattr(hf, "model_type", "llama")
        attention_bias = getattr(hf, "attention_bias", False)
        qwen = model_type.startswith("qwen2")
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None),
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=getattr(hf, "max_position_embeddings", 4096),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=True if qwen else bool(attention_bias),
            o_bias=False if qwen else bool(attention_bias),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            num_experts=getattr(hf, "num_local_experts", 0) or 0,
            num_experts_per_tok=getattr(hf, "num_experts_per_tok", 2),
            hidden_act=getattr(hf, "hidden_act", "silu"),
            # Mistral and Mixtral window every layer; Qwen2 only when use_sliding_window is set
            # (and then per layer, which is not implemented here: full attention).
            sliding_window=getattr(hf, "sliding_window", None) if model_type in ("mistral", "mixtral") else None,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_id=getattr(hf, "eos_token_id", None),
            model_type=model_type,
        )


PRESETS: dict[str, LlamaConfig] = {
    "llama-2-7b": LlamaConfig(),
    "llama-3-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000,
        eos_token_id=128001,
    ),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    # tiny-* presets: 8 kv heads where they are meant to split 8 ways under tp.
    "tiny-llama": LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=16,
        num_kv_heads=8, max_position_embeddings=256,
    ),
    "tiny-llama-3": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
        rope_theta=500000.0, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    ),
    "tiny-smollm2": LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=192, num_layers=2, num_heads=3, num_kv_heads=1,
        tie_word_embeddings=True, max_position_embeddings=256,
    ),
    "tiny-mixtral": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=8,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=256, model_type="mixtral",
    ),
}  # fmt: skip


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, layer_idx: int):
        super().__init__()
        self.c, self.layer_idx = c, layer_idx
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)

    def forward(self, x, cos, sin, mask, cache, cache_position):
        b, t, _ = x.shape
        d = self.c.head_dim
        q = self.q_proj(x).view(b, t, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(attend(q, k, v, mask, d**-0.5, cache, self.layer_idx, cache_position))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(c, layer_idx)
        if c.num_experts:
            self.mlp = MoE(c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok,
                           c.hidden_act, routing="topk_softmax")  # fmt: skip
        else:
            self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, cache_position):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_position)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    DECODER_LAYERS = "model.layers"
    LAYER_BLOCKS = ("self_attn", "mlp")
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        cache_position: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ):
        x = self.model.embed_tokens(input_ids)
        x, new_cache = self.run_layers(self.model.layers, x, positions, kv_cache, cache_position, attention_mask)
        return self.lm_head(self.model.norm(x)), new_cache

    # -- what the bridge needs to know about this model ---------------------------------------------
    def head_layout(self):
        return head_layout_for(["q_proj", "k_proj", "v_proj"], ["o_proj"], self.config.head_dim)

    def tied_parameters(self):
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def kv_projections(self):
        return [(r"\.(k_proj|v_proj)\.(weight|bias|scale)$", self.config.head_dim)]
