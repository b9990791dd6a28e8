"""A transformers model's own parallel plan, read as rows the bridge can place: the config's
``base_model_tp_plan`` (and the head's ``_tp_plan``) map module globs to styles (``colwise``,
``rowwise``, ``packed_colwise``, ``colwise_gather_output``, ``rowwise_split_input``,
``replicated_with_grad_allreduce``, MoE entries). Translated per parameter at load time, so an
architecture released tomorrow shards by its authors' plan with no row written by us. Plain torch.

Every style is a split of one dim of the weight, which GSPMD turns into the same program Megatron
writes by hand: column styles split the output features (dim -2 of a ``[.., out, in]`` weight, dim 0
of a bias), row styles the input features (dim -1; the bias stays whole), so one all-reduce follows
each row-parallel matmul. ``*_gather_output`` / ``*_split_input`` differ only in what torch's
DTensor does with the activations; under GSPMD the weight split says all of it.
"""

from __future__ import annotations

import re
from typing import Optional

from torch import nn

COLUMN_STYLES = ("colwise", "colwise_gather_output", "packed_colwise", "local_colwise", "colwise_rep")
ROW_STYLES = ("rowwise", "rowwise_split_input", "packed_rowwise", "local_rowwise", "rowwise_rep")


def hf_plan(model: nn.Module) -> dict[str, str]:
    """Module glob (full path from the top model) -> style: the base model's plan under its prefix,
    plus the head's (``lm_head``)."""
    hf = getattr(model, "hf", model)
    config = hf.config.get_text_config(decoder=True)
    base = getattr(config, "base_model_tp_plan", None) or getattr(hf.config, "base_model_tp_plan", None) or {}
    prefix = getattr(hf, "base_model_prefix", "")
    plan = {(f"{prefix}.{k}" if prefix else k): v for k, v in base.items()}
    plan.update(getattr(hf, "_tp_plan", None) or {})
    return plan


def _glob_to_regex(glob: str) -> re.Pattern:
    return re.compile("^" + re.escape(glob).replace(r"\*", r"[^.]+") + r"(\.|$)")


def _generic(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> a regex for that parameter in every layer."""
    return "^" + re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)) + "$"


def split_dim(style: str, ndim: int) -> Optional[int]:
    """The dim a style splits on a parameter of rank ``ndim`` (None: kept whole)."""
    if style in COLUMN_STYLES:
        return ndim - 2 if ndim >= 2 else 0
    if style in ROW_STYLES:
        return ndim - 1 if ndim >= 2 else None
    if style == "embedding_rowwise":  # an embedding [vocab, hidden] split by vocab rows
        return 0
    if style == "embedding_colwise":
        return ndim - 1
    return None  # replicated_with_grad_allreduce, moe dispatch entries, sequence parallel, ...


def parallel_plan_rows(model: nn.Module) -> list[tuple[str, Optional[int]]]:
    """(regex, dim) for every parameter the plan names, deduplicated across layers. A parameter is
    covered by the longest glob that matches its module path (``...experts.gate_up_proj`` over
    ``...experts``)."""
    plan = [(glob, _glob_to_regex(glob), style) for glob, style in hf_plan(model).items()]
    rows: dict[str, Optional[int]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        hits = [(len(g), style) for g, rx, style in plan if rx.search(name)]
        if not hits:
            continue
        style = max(hits)[1]
        rows.setdefault(_generic(name), split_dim(style, p.ndim))
    return list(rows.items())


def head_layout_from_plan(model) -> list[tuple[str, int, int]]:
    """Every matrix in a decoder layer's attention block keeps whole heads (``head_dim`` rows or
    columns) on whichever dim a scheme splits: fused q/k/v and Conv1D layouts included. Where the
    layers' head dims differ (Inkling's sliding layers: 128, its global ones: 16), each layer gets
    its own rows. A per-head gate (Laguna's and Dots-3's ``g_proj``: as many rows as the block has
    query heads, its ``num_heads``) keeps whole heads of one row each."""
    blocks = [b for b in model.LAYER_BLOCKS if "att" in b.lower()]
    dims = [s.kv[1] if s.kv else None for s in model.cache_shapes()]
    if not blocks or not any(dims):  # no attention layer (Mamba): no heads to keep whole
        return []
    per_head = set()  # (regex, dim): one row per query head, which no whole head_dim rows could be
    for (_, layer), head_dim in zip(model.decoder_layers(), dims):
        for b in blocks:
            heads = getattr(getattr(layer, b, None), "num_heads", None)
            for name, p in getattr(layer, b).named_parameters() if isinstance(heads, int) and head_dim else ():
                per_head |= {(rf"\.{re.escape(b)}\.{re.escape(name)}$", d) for d in (0, 1)
                             if p.ndim > d and p.shape[d] == heads and heads % head_dim}  # fmt: skip
    # the head-dim rows hold for every other tensor of the block
    keep = rf"^(?!.*(?:{'|'.join(rx for rx, _ in per_head)})).*" if per_head else ""
    tail = r"\.(" + "|".join(map(re.escape, blocks)) + r")\.([^.]+\.)*[^.]+\.(weight|bias|scale)$"
    gates = [(rx, d, 1) for rx, d in per_head]
    if len(set(filter(None, dims))) == 1:
        head_dim = next(filter(None, dims))
        return [(keep + tail, 0, head_dim), (keep + tail, 1, head_dim)] + gates
    stack = re.escape(model.DECODER_LAYERS)
    return [(rf"{keep}{stack}\.{i}{tail}", d, head_dim) for i, head_dim in enumerate(dims) if head_dim for d in (0, 1)] + gates
