"""Megatron / GPT-NeoX tensor-parallel checkpoints: GPT-NeoX-20B's "slim weights", opened as they are.

The published layout (EleutherAI/gpt-neox: ``tools/ckpts/convert_neox_to_hf.py``, ``merge20b.py``)::

    DIR/latest                       "global_step150000"
    DIR/configs/20B.yml              the GPT-NeoX YAML config (keys with - or _)
    DIR/20B_tokenizer.json           a ``tokenizers`` file
    DIR/global_step150000/layer_{i:02d}-model_{p:02d}-model_states.pt

one ``torch.save`` dict per (pipeline layer i, tensor-parallel partition p): layer 0 the embedding,
2..L+1 the transformer layers, L+3 the final norm, L+4 the readout (absent when the embedding is
tied). How each tensor merges is a table, like the sharding schemes: first matching rule wins.

``NeoXSlimWeights`` serves them as ``StoredWeights``: a device's slice of a column-parallel tensor is
read from the partitions that hold its rows only (memory-mapped, one layer file at a time), so
loading onto tp 2 places each partition where it already belongs, and nothing is merged in host
memory. ``load_neox_partitions`` merges everything (``convert``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from bridge.errors import CheckpointError
from bridge.stored import StoredWeights

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


# ---------------------------------------------------------------------------------------------------
# The slim-weights directory: found by its files, configured by its YAML, read slice by slice
# ---------------------------------------------------------------------------------------------------
def _layer_files(directory: Path) -> dict[int, dict[int, Path]]:
    files: dict[int, dict[int, Path]] = {}
    for f in directory.iterdir() if directory.is_dir() else ():
        m = LAYER_FILE.fullmatch(f.name)
        if m:
            files.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
    return files


def find_neox(path: Path) -> Path | None:
    """The directory holding the ``layer_XX-model_PP-model_states.pt`` files of ``path``: ``path``
    itself, the step ``path/latest`` names, or its one ``global_step*`` directory; None if none."""
    path = Path(path)
    if _layer_files(path):
        return path
    latest = path / "latest"
    if latest.is_file() and _layer_files(path / latest.read_text().strip()):
        return path / latest.read_text().strip()
    steps = sorted((d for d in path.glob("global_step*") if _layer_files(d)), key=lambda d: int(re.sub(r"\D", "", d.name) or 0))
    return steps[-1] if steps else None


def neox_yaml(layers_dir: Path) -> dict:
    """The GPT-NeoX YAML config beside the step directory (``configs/*.yml``, merged as NeoX merges
    several), keys normalised to ``_``."""
    import yaml

    for d in (layers_dir, layers_dir.parent, layers_dir.parent.parent):
        ymls = sorted((d / "configs").glob("*.yml")) + sorted((d / "configs").glob("*.yaml")) or sorted(d.glob("*.yml"))
        if ymls:
            break
    else:
        raise CheckpointError(f"{layers_dir}: no GPT-NeoX config (configs/20B.yml) beside the partitions; "
                              f"copy the configs/ directory of the release next to them")  # fmt: skip
    merged = {}
    for y in ymls:
        try:
            data = yaml.safe_load(y.read_text())
        except yaml.YAMLError as e:
            raise CheckpointError(f"{y} is not valid YAML ({str(e).splitlines()[0]})") from None
        if isinstance(data, dict):
            merged.update({str(k).replace("-", "_"): v for k, v in data.items()})
    return merged


def neox_hf_config(neox: dict, vocab_size: int, where: str):
    """transformers' ``GPTNeoXConfig`` from a GPT-NeoX YAML, as EleutherAI's ``convert_neox_to_hf.py``
    builds it; the vocabulary size is the embedding's (padded) row count."""
    from transformers import GPTNeoXConfig

    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if k not in neox]
    if missing:
        raise CheckpointError(f"{where}: the GPT-NeoX config lacks {', '.join(missing)}")
    for key, want in (("pos_emb", "rotary"), ("norm", "layernorm")):
        if neox.get(key, want) != want:
            raise CheckpointError(f"{where}: {key} {neox[key]!r} is not supported (GPT-NeoX models here use {want})")
    if neox.get("gpt_j_tied", False):
        raise CheckpointError(f"{where}: gpt_j_tied (one layer norm per block) is not supported")
    hidden = neox["hidden_size"]
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=neox["num_layers"],
        num_attention_heads=neox["num_attention_heads"],
        intermediate_size=neox.get("intermediate_size", 4 * hidden),
        max_position_embeddings=neox.get("max_position_embeddings", neox.get("seq_length", 2048)),
        rotary_pct=neox.get("rotary_pct", 1.0), rotary_emb_base=neox.get("rotary_emb_base", 10000),
        use_parallel_residual=neox.get("gpt_j_residual", False), layer_norm_eps=neox.get("layernorm_epsilon", 1e-5),
        tie_word_embeddings=not neox.get("no_weight_tying", False), hidden_act=neox.get("activation", "gelu"),
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def _load_partition(f: Path) -> dict:
    """One partition file, memory-mapped (only the pages a slice touches are read), through
    ``torch.load(weights_only=True)``: a file that asks to run code is refused."""
    try:
        try:
            return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a pre-1.6 (non-zip) torch.save file cannot be mapped
            if "mmap" not in str(e):
                raise
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's UnpicklingError, zip and IO errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f}: refused or unreadable ({first}); a slim-weights partition holds only tensors") from None


def _numpy(t: torch.Tensor):
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


class NeoXSlimWeights(StoredWeights):
    """GPT-NeoX slim weights as ``StoredWeights`` under transformers' GPT-NeoX names."""

    def __init__(self, path: Path):
        layers_dir = find_neox(path)
        if layers_dir is None:
            raise CheckpointError(f"{path} holds no layer_XX-model_PP-model_states.pt files")
        self.dir, self.label = layers_dir, f"placing {layers_dir.name}"
        self.neox = neox_yaml(layers_dir)
        self.files = _layer_files(layers_dir)
        counts = {len(v) for v in self.files.values()}
        if len(counts) != 1:
            raise CheckpointError(f"{layers_dir}: layers have different partition counts {sorted(counts)}")
        self.partitions = counts.pop()
        num_layers = self.neox.get("num_layers")
        if not isinstance(num_layers, int):
            raise CheckpointError(f"{layers_dir}: the GPT-NeoX config has no num_layers")
        layout = neox_file_layout(num_layers)
        if not self.neox.get("no_weight_tying", False):
            layout.pop(num_layers + 4)  # tied: the readout is the embedding
        missing = sorted(set(layout) - set(self.files))
        if missing:
            raise CheckpointError(f"{layers_dir}: no files for layers {missing} of a {num_layers}-layer model")
        # name -> (file layer, name in the file, merge rule, per-partition shape)
        self.where: dict[str, tuple[int, str, str, tuple]] = {}
        for layer, prefix in layout.items():
            part = _load_partition(self.files[layer][0])
            for local, t in part.items():
                if not NEOX_SKIP.search(local):
                    self.where[_to_hf(prefix, local)] = (layer, local, _rule(local, NEOX_MERGE_RULES), tuple(t.shape))
            del part
        embed = self.where["gpt_neox.embed_in.weight"]
        self.hf_config = neox_hf_config(self.neox, embed[3][0] * self.partitions, str(layers_dir))

    def shapes(self):
        out = {}
        for name, (_, _, how, shape) in self.where.items():
            d = {"concat0": 0, "concat1": 1}.get(how)
            out[name] = shape if d is None else tuple(n * self.partitions if i == d else n for i, n in enumerate(shape))
        return out

    def read(self, name, index=()):
        layer, local, how, shape = self.where[name]
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        files = [self.files[layer][p] for p in sorted(self.files[layer])]
        if how in ("concat0", "concat1"):
            d = 0 if how == "concat0" else 1
            size = shape[d]
            full = range(size * self.partitions)
            want = full[index[d]]
            strided = want.step != 1
            want = full if strided else want
            pieces = []
            for p, f in enumerate(files):  # only the partitions holding rows of this slice are opened
                lo, hi = max(want.start, p * size), min(want.stop, (p + 1) * size)
                if lo < hi or (not pieces and p == len(files) - 1):
                    local_index = list(index)
                    local_index[d] = slice(lo - p * size, max(lo, hi) - p * size)
                    pieces.append(_numpy(_load_partition(f)[local][tuple(local_index)]))
            out = np.concatenate(pieces, axis=d) if len(pieces) > 1 else pieces[0]
            if strided:
                out = out[(slice(None),) * d + (index[d],)]
            return out
        parts = [_numpy(_load_partition(f)[local][index]) for f in files]
        if how == "sum":  # row-parallel biases: each partition's output carried a share (gpt_j_residual)
            return np.sum(np.stack([p.astype(np.float32) for p in parts]), axis=0).astype(parts[0].dtype)
        for i, p in enumerate(parts[1:], 1):  # "equal": replicated copies
            if not np.array_equal(p, parts[0]):
                raise CheckpointError(f"{name} in layer file {layer:02d}: partition {i} differs from partition 0; "
                                      f"replicated tensors must be identical in every partition")  # fmt: skip
        return parts[0]


def write_neox_slim_weights(state: Mapping[str, torch.Tensor], hf_config, n: int, directory, step: int = 150000,
                            tokenizer=None) -> Path:  # fmt: skip
    """Writes a HF-named GPT-NeoX state dict as the published slim-weights layout, ``n``-way tensor
    parallel (``latest``, ``configs/20B.yml``, ``global_step{step}/layer_XX-model_PP-model_states.pt``,
    and ``20B_tokenizer.json`` when ``tokenizer`` is given), atomically. Each transformer layer file
    also holds its ``attention.rotary_emb.inv_freq``, as the published ones do."""
    import yaml

    from bridge.files import atomic_directory

    c = hf_config
    rope = getattr(c, "rope_parameters", None) or {}
    rotary_pct = rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0))
    base = rope.get("rope_theta", getattr(c, "rotary_emb_base", 10000))
    neox = {
        "vocab_file": "./20B_checkpoints/20B_tokenizer.json", "save": "./20B_checkpoints", "load": "./20B_checkpoints",
        "pipe_parallel_size": 1, "model_parallel_size": n,
        "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size, "seq_length": c.max_position_embeddings,
        "max_position_embeddings": c.max_position_embeddings, "norm": "layernorm", "pos_emb": "rotary",
        "rotary_pct": rotary_pct, "rotary_emb_base": base, "no_weight_tying": not c.tie_word_embeddings,
        "gpt_j_residual": c.use_parallel_residual, "output_layer_parallelism": "column",
        "layernorm_epsilon": c.layer_norm_eps, "tokenizer_type": "HFTokenizer",
    }  # fmt: skip
    head_dim = c.hidden_size // c.num_attention_heads
    rot = int(head_dim * rotary_pct)
    inv_freq = 1.0 / (float(base) ** (torch.arange(0, rot, 2).float() / rot))
    directory = Path(directory)
    layout = neox_file_layout(c.num_hidden_layers)
    if c.tie_word_embeddings:
        layout.pop(c.num_hidden_layers + 4)
    with atomic_directory(directory) as tmp:
        steps = tmp.path / f"global_step{step}"
        steps.mkdir()
        for layer, prefix in layout.items():
            local = {_from_hf(prefix, k): v for k, v in state.items() if k.startswith(prefix)}
            for p, part in enumerate(split_state(local, n)):
                if prefix.startswith("gpt_neox.layers."):
                    part["attention.rotary_emb.inv_freq"] = inv_freq.clone()
                torch.save(part, steps / f"layer_{layer:02d}-model_{p:02d}-model_states.pt")
        (tmp.path / "configs").mkdir()
        (tmp.path / "configs" / "20B.yml").write_text(yaml.safe_dump(neox, sort_keys=False))
        (tmp.path / "latest").write_text(f"global_step{step}")
        if tokenizer is not None:
            tokenizer.backend_tokenizer.save(str(tmp.path / "20B_tokenizer.json"))
        tmp.commit()
    return directory


def find_neox_tokenizer(layers_dir: Path, neox: dict) -> Path | None:
    """The ``tokenizers`` file the YAML's ``vocab_file`` names, looked for beside the release."""
    names = [Path(str(neox.get("vocab_file", ""))).name, "20B_tokenizer.json", "tokenizer.json"]
    for d in (layers_dir, layers_dir.parent, layers_dir.parent.parent):
        for n in names:
            if n and (d / n).is_file() and n.endswith(".json"):
                return d / n
    return None
