"""Pieces every model here shares: RMSNorm, RoPE, masked attention over a functional KV cache, MoE.

Plain torch, no JAX. Everything is written so the lifted function stays pure under torchax:
tensor factories take ``device=`` from an input, the KV cache is passed in and returned (never
mutated in place), and there is no data-dependent control flow (MoE routing is dense).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .contract import CausalLMContract, KVCache, LayerCaches, LayerKV  # noqa: F401  (re-exported)



def init_kv_cache(
    num_layers: int, batch: int, kv_heads: int, max_seq: int, head_dim: int, dtype, device=None
) -> KVCache:
    shape = (batch, kv_heads, max_seq, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]


class CausalLM(CausalLMContract):
    """What every model here shares: the activation dtype and a KV cache shaped from its config
    (``num_layers``, ``num_kv_heads``, ``head_dim``). Each family adds ``head_layout`` and the
    contract's class attributes."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations run in: that of the first floating-point parameter (not int8)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def init_kv_cache(self, batch: int, max_seq: int, dtype=None, device=None) -> KVCache:
        c = self.config
        return init_kv_cache(c.num_layers, batch, c.num_kv_heads, max_seq, c.head_dim, dtype or self.dtype, device)

    @property
    def kv_cache_heads(self) -> int:
        return self.config.num_kv_heads

    @property
    def query_heads(self) -> int:
        return self.config.num_heads

    def run_layers(self, layers, x, positions, kv_cache, cache_position, attention_mask):
        """The decoder stack every model shares: RoPE tables (``rotary_dim`` of the config, else
        ``head_dim``; ``rope_scaling`` when set), the masks, and each layer in turn, each writing its
        part of the cache (``LayerCaches``). Returns (hidden states, new cache or None)."""
        c = self.config
        positions, cache_position = default_positions(x, positions, kv_cache, cache_position)
        rot_dim = getattr(c, "rotary_dim", c.head_dim)
        inv_freq = rope_inv_freq(rot_dim, c.rope_theta, getattr(c, "rope_scaling", None), x.device)
        cos, sin = rope_cos_sin(positions, inv_freq, x.dtype)
        window = getattr(c, "sliding_window", None)
        # The cache length is the keys' second-to-last dim, whatever the layout (a stacked cache has
        # a leading layer dim).
        cache = None if kv_cache is None else LayerCaches(kv_cache)
        mask = Masks(cache_position, None if cache is None else cache.length, attention_mask, window, x.dtype)
        for layer in layers:
            x = layer(x, cos, sin, mask, cache, cache_position)
        return x, None if cache is None else cache.layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 sums lose precision), scale in the input dtype as HF does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class TiedHead(nn.Module):
    """An LM head that reads its embedding's table instead of holding a copy.

    The embedding is kept out of this module's registered children, so its tensors are listed once
    (under the embedding's name) by ``state_dict`` and by ``torchax.extract_jax``.
    """

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._embedding[0].weight)


# ---------------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------------
def rope_inv_freq(rot_dim: int, theta: float, scaling: Optional[dict], device) -> torch.Tensor:
    """Inverse frequencies, with the Llama-3 (``rope_type: llama3``) long-context scaling when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float32) / rot_dim))
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        inv_freq = inv_freq / scaling["factor"]
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, 1, T, rot_dim] (the rotate-half layout HF checkpoints use)."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, rot/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first ``cos.shape[-1]`` features of each head (partial rotary when smaller)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    x_rot = x_rot * cos + rotated * sin
    return torch.cat([x_rot, x_pass], dim=-1) if x_pass.shape[-1] else x_rot


# ---------------------------------------------------------------------------------------------------
# Masks and attention
# ---------------------------------------------------------------------------------------------------
class Masks:
    """Which keys each new query sees, as an additive bias in the activation dtype (0 where a key is
    seen, the dtype's lowest value where not: finite, so a fully masked row, a left-padding query,
    gets a uniform softmax instead of NaN).

    With a cache of ``cache_len`` columns the keys are the cache after this call's keys are written
    at ``cache_position`` ([B|1, 1, T, S]); without one, this call's own keys ([B|1, 1, T, T]).
    """

    def __init__(
        self,
        cache_position: torch.Tensor,
        cache_len: Optional[int],
        key_mask: Optional[torch.Tensor],
        window: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
    ):
        cols = cache_position if cache_len is None else torch.arange(cache_len, device=cache_position.device)
        seen = cols[None, :] <= cache_position[:, None]  # causal: [T, S]
        if window is not None:  # sliding window: a query sees the `window` columns ending at its own
            seen = seen & (cache_position[:, None] - cols[None, :] < window)
        seen = seen[None, None]
        if key_mask is not None:
            key_mask = key_mask.bool()
            seen = seen & (key_mask.index_select(1, cache_position) if cache_len is None else key_mask)[:, None, None, :]
        zero = torch.zeros((), dtype=dtype, device=cache_position.device)
        self.bias = torch.where(seen, zero, torch.finfo(dtype).min)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    masks: Masks,
    scale: float,
    cache: Optional[LayerCaches] = None,
    layer: int = 0,
    cache_position: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Grouped-query attention of q [B, Hq, T, D] with this call's k/v [B, Hkv, T, D] -> [B, T, Hq*D].

    With a cache, the new keys/values are written into ``layer``'s part at ``cache_position`` first
    and the queries attend over that layer's whole cache, as transformers' caches do.
    ``F.scaled_dot_product_attention`` with ``enable_gqa``: query heads grouped under their kv head,
    keys never repeated. ``softcap`` (Grok-1) applies ``c * tanh(s / c)`` to the scores, which SDPA
    cannot: written out, fp32 scores.
    """
    b, hq, t, d = q.shape
    if cache is not None:
        k, v = (x.to(q.dtype) for x in cache.update(layer, k, v, cache_position))
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks.bias, scale=scale, enable_gqa=True)
    else:
        hkv = k.shape[1]
        s = torch.einsum("bhgtd,bhsd->bhgts", q.reshape(b, hkv, hq // hkv, t, d), k).float() * scale
        s = softcap * torch.tanh(s / softcap) + masks.bias[:, :, None].float()
        probs = torch.softmax(s, dim=-1).to(v.dtype)
        out = torch.einsum("bhgts,bhsd->bhgtd", probs, v).reshape(b, hq, t, d)
    return out.transpose(1, 2).reshape(b, t, hq * d)


def default_positions(input_ids: torch.Tensor, positions, kv_cache, cache_position):
    """Fills in positions [B, T] (RoPE) and cache_position [T] (cache columns) when not given.
    ``input_ids`` may be any [B, T, ...] tensor of the call (only its shape and device are used)."""
    t = input_ids.shape[1]
    if cache_position is None:
        start = 0 if positions is None else positions[0, 0]
        cache_position = torch.arange(t, device=input_ids.device) + start
    if positions is None:
        positions = cache_position[None, :].expand(input_ids.shape[0], t)
    return positions, cache_position


# ---------------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------------
class Router(nn.Module):
    """``gate.weight`` [E, H], computed in fp32."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class Experts(nn.Module):
    """Stacked expert weights, the layout of transformers' Mixtral: ``gate_up_proj`` [E, 2F, H] and
    ``down_proj`` [E, H, F], so one sharding rule places the expert dim of all of them."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, dtype=torch.float32):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * ffn, hidden, dtype=dtype))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden, ffn, dtype=dtype))

    def project_in(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, E, 2F]
        return torch.einsum("nh,eoh->neo", x, self.gate_up_proj.to(x.dtype))

    def project_out(self, a: torch.Tensor) -> torch.Tensor:  # [N, E, F] -> [N, E, H]
        return torch.einsum("nef,ehf->neh", a, self.down_proj.to(a.dtype))


class MoE(nn.Module):
    """Top-k mixture of gated-FFN experts.

    routing="softmax_topk" (Grok-1): softmax over all experts, keep the top k probabilities as they
    are. routing="topk_softmax" (Mixtral): the same top k, renormalised to sum to one.

    Dispatch is dense: every expert runs on every token and a combine matrix that is zero outside
    each token's top k mixes the results. That has no data-dependent shapes (jit-friendly) and under
    expert parallelism each device runs only its own experts, then one reduction combines them.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, activation: str, routing: str):
        super().__init__()
        if routing not in ("softmax_topk", "topk_softmax"):
            raise ValueError(f"routing must be softmax_topk or topk_softmax, got {routing!r}")
        self.top_k, self.routing, self.num_experts = top_k, routing, num_experts
        self.act = {"silu": F.silu, "gelu": lambda x: F.gelu(x, approximate="none")}[activation]
        self.gate = Router(hidden, num_experts)
        self.experts = Experts(num_experts, hidden, ffn)

    def combine_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, E] routing weights, zero outside each token's top k."""
        probs = torch.softmax(self.gate(x), dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.routing == "topk_softmax":
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(1, top_i, top_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        combine = self.combine_weights(x).to(x.dtype)
        gate, up = self.experts.project_in(x).chunk(2, dim=-1)
        y = self.experts.project_out(self.act(gate) * up)
        return torch.einsum("neh,ne->nh", y, combine).reshape(shape)


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once (tied weights once), buffers excluded; works on the meta device."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    for name, b in model.named_buffers():
        if b.dtype == torch.int8:  # quantized weights are buffers (they take no gradient)
            n += b.numel()
    return n


def head_layout_for(q_out: Sequence[str], o_in: Sequence[str], head_dim: int) -> list[tuple[str, int, int]]:
    """Sharding metadata: which tensors carry whole heads on which dim (see sharding.resolve_placements)."""
    col = "|".join(q_out)
    row = "|".join(o_in)
    return [
        (rf"\.({col})\.(weight|bias|scale)$", 0, head_dim),
        (rf"\.({row})\.weight$", 1, head_dim),
    ]
