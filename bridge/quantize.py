"""Weight-only int8 for any model, applied by the bridge at load (gpt-fast's ``quantize.py``): every
``nn.Linear`` and ``nn.Embedding`` of a module (ours, transformers' classes, a user's) becomes its
int8 version with one scale per output channel, and the model's definition stays plain torch.

The int8 product is one torch op of the bridge's own (``torchax_bridge::int8_linear``), so the
bridge's lowering reads the int8 weight as it is: its CPU small-batch kernel for batched decode,
XLA's fused conversion for one row (``bridge.lowerings.int8_linear``). The scales are parameters named
after their weight (``<linear>.scale``), so the sharding rules that place a weight's output dim place
its scale with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_torch.common import Experts, TiedHead


@torch.library.custom_op("torchax_bridge::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scale)^T`` for int8 ``weight`` [out, in] and per-output-channel ``scale``
    [out]: ``(x @ weight^T) * scale``, never materialising the float weight."""
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


@int8_linear.register_fake
def _(x, weight, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: scale = absmax / 127 (the scale in ``w``'s dtype)."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


class QuantizedLinear(nn.Module):
    """Weight-only int8 linear, grok-1's ``QuantizedWeight8bit``: ``weight.astype(scale.dtype) * scale``.

    ``weight`` is int8 ``[out, in]``, ``scale`` is per output channel ``[out]`` (symmetric, absmax/127).
    Holds the same names as ``nn.Linear`` plus ``scale``, so sharding rules place the scale with its
    weight's output dim.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.scale = nn.Parameter(torch.ones(out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantizedLinear":
        w = linear.weight.detach()
        with torch.device(w.device):  # meta stays meta (planning)
            q = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype)
        q.weight, q.scale.data = quantize_rows(w)
        if linear.bias is not None:
            q.bias.data = linear.bias.detach().clone()
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias


class QuantizedEmbedding(nn.Module):
    """int8 embedding table with one scale per row (token): ``weight[ids] * scale[ids]``.

    A tied LM head shares this table and its scales (a row of the table is an output channel of the
    head), so tying survives quantization with no second copy.
    """

    def __init__(self, num_embeddings: int, dim: int, dtype=torch.float32):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_embeddings, dim, dtype=torch.int8))
        self.scale = nn.Parameter(torch.ones(num_embeddings, dtype=dtype))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "QuantizedEmbedding":
        w = emb.weight.detach()
        with torch.device(w.device):  # meta stays meta (planning)
            q = cls(w.shape[0], w.shape[1], dtype=w.dtype)
        q.weight, q.scale.data = quantize_rows(w)
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.scale.dtype) * self.scale[ids][..., None]


class QuantizedTiedHead(TiedHead):
    """An LM head tied to a ``QuantizedEmbedding``: the int8 table and its scales, no copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self._embedding[0]
        return int8_linear(x, table.weight, table.scale)


class QuantizedExperts(Experts):
    """``Experts`` with int8 ``gate_up_proj`` [E, 2F, H] / ``down_proj`` [E, H, F] and
    per-output-channel ``gate_up_proj_scale`` [E, 2F] / ``down_proj_scale`` [E, H]."""

    @classmethod
    def from_experts(cls, experts: Experts) -> "QuantizedExperts":
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name).detach()
            e, o, i = w.shape
            weight, scale = quantize_rows(w.reshape(e * o, i))
            q.register_buffer(name, weight.reshape(e, o, i))
            setattr(q, f"{name}_scale", nn.Parameter(scale.reshape(e, o)))
        return q

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        return super().project_in(x) * self.gate_up_proj_scale.to(x.dtype)

    def project_out(self, a: torch.Tensor) -> torch.Tensor:
        return super().project_out(a) * self.down_proj_scale.to(a.dtype)


def quantize_int8(model: nn.Module, embeddings: bool = True) -> nn.Module:
    """Swaps every ``nn.Linear`` / ``nn.Embedding`` (and our MoE ``Experts``) for its int8 version, in
    place; returns the model. A head tied to the embedding (the same weight tensor, or a
    ``TiedHead``) reads the quantized table. ``embeddings=False`` keeps embedding tables (and a head
    tied to one) in float, as grok-1's own checkpoint stores them."""
    tables: dict[int, QuantizedEmbedding] = {}
    kept: set[int] = set()  # float tables left as they are (and a head tied to one)

    def swap(module: nn.Module):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Embedding) and not embeddings:
                kept.add(id(child.weight))
            elif isinstance(child, nn.Embedding):
                q = QuantizedEmbedding.from_embedding(child)
                tables[id(child.weight)] = q
                setattr(module, name, q)
            elif isinstance(child, Experts) and not isinstance(child, QuantizedExperts):
                setattr(module, name, QuantizedExperts.from_experts(child))
            elif isinstance(child, nn.Linear) and id(child.weight) not in kept:
                tied = tables.get(id(child.weight))
                if tied is not None and child.bias is None:
                    setattr(module, name, QuantizedTiedHead(tied))
                else:
                    setattr(module, name, QuantizedLinear.from_linear(child))
            elif not isinstance(child, (nn.Linear, TiedHead)):
                swap(child)

    swap(model)

    def retie(module: nn.Module):  # a TiedHead (registered anywhere) over a table quantized above
        for name, child in list(module.named_children()):
            if type(child) is TiedHead and id(child._embedding[0].weight) in tables:
                setattr(module, name, QuantizedTiedHead(tables[id(child._embedding[0].weight)]))
            else:
                retie(child)

    # TiedHead keeps its table's module; that module is replaced above, so match by the old weight.
    retie(model)
    return model
