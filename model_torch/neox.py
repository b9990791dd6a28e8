"""GPT-NeoX (Pythia, NeoX-20B): LayerNorm, fused per-head QKV, partial rotary, parallel residual.

Names are transformers' (``gpt_neox.layers.0.attention.query_key_value.weight``, ``lm_head.weight``;
checkpoint files written before transformers 5 call the head ``embed_out``: ``CHECKPOINT_RENAMES``).
The fused QKV output is laid out per head (``[q|k|v]`` for each head), so splitting its dim 0 over a
model axis lands on head boundaries. Same ``forward`` contract as ``llama.LlamaForCausalLM``.
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
    apply_rope,
    attend,
)


@dataclasses.dataclass
class GPTNeoXConfig:
    vocab_size: int = 50432
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_layers: int = 44
    num_heads: int = 64
    rotary_pct: float = 0.25
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 0
    eos_token_id: Any = 0
    model_type: str = "gpt_neox"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @classmethod
    def from_hf(cls, hf) -> "GPTNeoXConfig":
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            rotary_pct=rope.get("partial_rotary_factor", getattr(hf, "rotary_pct", 0.25)),
            rope_theta=float(rope.get("rope_theta", getattr(hf, "rotary_emb_base", 10000.0))),
            layer_norm_eps=hf.layer_norm_eps,
            use_parallel_residual=hf.use_parallel_residual,
            attention_bias=getattr(hf, "attention_bias", True),
            hidden_act=hf.hidden_act,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_id=getattr(hf, "eos_token_id", None),
        )


PRESETS: dict[str, GPTNeoXConfig] = {
    "neox-20b": GPTNeoXConfig(),
    "pythia-70m": GPTNeoXConfig(
        vocab_size=50304, hidden_size=512, intermediate_size=2048, num_layers=6, num_heads=8,
        max_position_embeddings=2048,
    ),
    "tiny-neox": GPTNeoXConfig(
        vocab_size=256, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=8,
        max_position_embeddings=256,
    ),
    "tiny-pythia": GPTNeoXConfig(
        vocab_size=256, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
        use_parallel_residual=False, max_position_embeddings=256,
    ),
}  # fmt: skip


def _activation(name: str):
    return {
        "gelu": lambda x: F.gelu(x),
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }[name]


class Attention(nn.Module):
    def __init__(self, c: GPTNeoXConfig, layer_idx: int):
        super().__init__()
        self.c, self.layer_idx = c, layer_idx
        self.query_key_value = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=c.attention_bias)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin, mask, cache, cache_position):
        b, t, _ = x.shape
        d = self.c.head_dim
        qkv = self.query_key_value(x).view(b, t, -1, 3 * d).transpose(1, 2)  # per head [q|k|v]
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.dense(attend(q, k, v, mask, d**-0.5, cache, self.layer_idx, cache_position))


class MLP(nn.Module):
    def __init__(self, c: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.hidden_size, c.intermediate_size)
        self.dense_4h_to_h = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = _activation(c.hidden_act)

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, c: GPTNeoXConfig, layer_idx: int):
        super().__init__()
        self.parallel = c.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention = Attention(c, layer_idx)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache, cache_position):
        a = self.attention(self.input_layernorm(x), cos, sin, mask, cache, cache_position)
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + a + self.mlp(self.post_attention_layernorm(x))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXModel(nn.Module):
    def __init__(self, c: GPTNeoXConfig):
        super().__init__()
        self.embed_in = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c, i) for i in range(c.num_layers))
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class GPTNeoXForCausalLM(CausalLM):
    DECODER_LAYERS = "gpt_neox.layers"
    LAYER_BLOCKS = ("attention", "mlp")
    # (regex, replacement) applied to checkpoint keys before loading: older files name the head embed_out.
    CHECKPOINT_RENAMES = ((r"^embed_out\.", "lm_head."),)

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.gpt_neox.embed_in.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        cache_position: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ):
        x = self.gpt_neox.embed_in(input_ids)
        x, new_cache = self.run_layers(self.gpt_neox.layers, x, positions, kv_cache, cache_position, attention_mask)
        return self.lm_head(self.gpt_neox.final_layer_norm(x)), new_cache

    def tied_parameters(self):
        return {"lm_head.weight": "gpt_neox.embed_in.weight"} if self.config.tie_word_embeddings else {}

    def head_layout(self):
        # The fused QKV carries 3 * head_dim rows per head.
        d = self.config.head_dim
        return [
            (r"\.query_key_value\.(weight|bias|scale)$", 0, 3 * d),
            (r"\.attention\.dense\.weight$", 1, d),
        ]
