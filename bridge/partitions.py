"""Megatron / GPT-NeoX tensor-parallel checkpoints: merge N partitions back into one state dict.

GPT-NeoX-20B's "slim weights" are split 2 ways: ``layer_{i:02d}-model_{p:02d}-model_states.pt`` for
partitions p, layer 0 the embedding, 2..(L+1) the transformer layers, L+3 the final norm, L+4 the
readout. How each tensor merges is a table, like the sharding schemes: first matching rule wins.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from bridge.checkpoints import CheckpointError

# (regex on the partition-local name, how to merge). Column-parallel tensors concatenate on dim 0,
# row-parallel on dim 1; row-parallel biases were split as partial sums; norms are replicated copies.
NEOX_MERGE_RULES: list[tuple[str, str]] = [
    (r"(^|\.)word_embeddings\.weight$", "concat0"),
    (r"attention\.query_key_value\.(weight|bias)$", "concat0"),
    (r"mlp\.dense_h_to_4h\.(weight|bias)$", "concat0"),
    (r"(^|\.)final_linear\.weight$", "concat0"),
    (r"attention\.dense\.weight$", "concat1"),
    (r"mlp\.dense_4h_to_h\.weight$", "concat1"),
    (r"attention\.dense\.bias$", "sum"),
    (r"mlp\.dense_4h_to_h\.bias$", "sum"),
    (r"(norm|layernorm)\.(weight|bias)$", "equal"),
]
NEOX_SKIP = re.compile(r"rotary_emb\.inv_freq$|attention\.(bias|masked_bias)$")


def _rule(name: str, rules) -> str:
    for pattern, how in rules:
        if re.search(pattern, name):
            return how
    raise CheckpointError(f"no merge rule for partition tensor {name!r}; add one to the merge rule table")


def merge_partitions(parts: Sequence[Mapping[str, torch.Tensor]], rules=NEOX_MERGE_RULES, where: str = "") -> dict:
    """Merges N partition state dicts (same keys) by ``rules``. Copies that must be equal are checked."""
    if not parts:
        raise CheckpointError(f"no partitions to merge{where}")
    keys = list(parts[0])
    for i, p in enumerate(parts[1:], 1):
        if set(p) != set(keys):
            raise CheckpointError(f"partition {i}{where} has keys {sorted(set(p) ^ set(keys))} the others lack")
    out = {}
    for name in keys:
        if NEOX_SKIP.search(name):
            continue
        tensors = [p[name] for p in parts]
        how = _rule(name, rules)
        if how == "concat0":
            out[name] = torch.cat(tensors, dim=0)
        elif how == "concat1":
            out[name] = torch.cat(tensors, dim=1)
        elif how == "sum":
            out[name] = torch.stack(tensors).sum(0)
        elif how == "equal":
            for i, t in enumerate(tensors[1:], 1):
                if not torch.equal(t, tensors[0]):
                    diff = (t.float() - tensors[0].float()).abs().max().item()
                    raise CheckpointError(
                        f"{name}{where}: partition {i} differs from partition 0 (max abs diff {diff:.3g}); "
                        f"replicated tensors must be identical in every partition"
                    )
            out[name] = torch.stack(tensors).float().mean(0).to(tensors[0].dtype)
        else:
            raise CheckpointError(f"unknown merge kind {how!r} for {name}")
    return out


def split_state(state: Mapping[str, torch.Tensor], n: int, rules=NEOX_MERGE_RULES) -> list[dict]:
    """The inverse of ``merge_partitions`` (for writing test partitions): sums split as x / n."""
    parts: list[dict] = [{} for _ in range(n)]
    for name, t in state.items():
        how = _rule(name, rules)
        if how in ("concat0", "concat1"):
            pieces = torch.chunk(t, n, dim=0 if how == "concat0" else 1)
            if len(pieces) != n or any(p.shape != pieces[0].shape for p in pieces):
                raise CheckpointError(f"{name} {list(t.shape)} does not split evenly {n} ways")
        elif how == "sum":
            pieces = [t / n] * n
        else:
            pieces = [t.clone() for _ in range(n)]
        for p, piece in zip(parts, pieces):
            p[name] = piece.contiguous()
    return parts


# ---------------------------------------------------------------------------------------------------
# NeoX slim-weight layout <-> transformers names
# ---------------------------------------------------------------------------------------------------
LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")


def neox_file_layout(num_layers: int) -> dict[int, str]:
    """File layer index -> HF name prefix."""
    layout = {0: "gpt_neox.embed_in."}
    layout.update({i + 2: f"gpt_neox.layers.{i}." for i in range(num_layers)})
    layout[num_layers + 3] = "gpt_neox.final_layer_norm."
    layout[num_layers + 4] = "lm_head."
    return layout


def _to_hf(prefix: str, name: str) -> str:
    if prefix == "gpt_neox.embed_in.":
        return prefix + name.replace("word_embeddings.", "")
    if prefix == "gpt_neox.final_layer_norm.":
        return prefix + name.split("norm.")[-1]
    if prefix == "lm_head.":
        return prefix + name.replace("final_linear.", "")
    return prefix + name


def _from_hf(prefix: str, name: str) -> str:
    rest = name[len(prefix) :]
    if prefix == "gpt_neox.embed_in.":
        return "word_embeddings." + rest
    if prefix == "gpt_neox.final_layer_norm.":
        return "norm." + rest
    if prefix == "lm_head.":
        return "final_linear." + rest
    return rest


def write_neox_partitions(state: Mapping[str, torch.Tensor], num_layers: int, n: int, directory) -> None:
    """Splits a HF-named NeoX state dict into NeoX slim-weight partition files (what tests load)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for layer, prefix in neox_file_layout(num_layers).items():
        local = {_from_hf(prefix, k): v for k, v in state.items() if k.startswith(prefix)}
        for p, part in enumerate(split_state(local, n)):
            torch.save(part, directory / f"layer_{layer:02d}-model_{p:02d}-model_states.pt")


def load_neox_partitions(directory, num_layers: int) -> dict[str, torch.Tensor]:
    """Reads every ``layer_XX-model_PP-model_states.pt`` under ``directory``, merges the partitions of
    each layer, and returns one state dict with transformers' GPT-NeoX names."""
    directory = Path(directory)
    files: dict[int, dict[int, Path]] = {}
    for f in directory.iterdir():
        m = LAYER_FILE.search(f.name)
        if m:
            files.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
    if not files:
        raise CheckpointError(f"{directory} holds no layer_XX-model_PP-model_states.pt files")
    layout = neox_file_layout(num_layers)
    missing = sorted(set(layout) - set(files))
    if missing:
        raise CheckpointError(f"{directory}: no files for layers {missing} of a {num_layers}-layer model")
    counts = {len(v) for v in files.values()}
    if len(counts) != 1:
        raise CheckpointError(f"{directory}: layers have different partition counts {sorted(counts)}")
    out = {}
    for layer, prefix in layout.items():
        parts = []
        for p in sorted(files[layer]):
            try:
                parts.append(torch.load(files[layer][p], map_location="cpu", weights_only=True))
            except Exception as e:
                raise CheckpointError(f"cannot read {files[layer][p]}: {e}") from None
        merged = merge_partitions(parts, where=f" in layer file {layer:02d}")
        out.update({_to_hf(prefix, k): v for k, v in merged.items()})
    return out
