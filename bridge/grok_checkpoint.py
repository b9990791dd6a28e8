"""Grok-1's published checkpoint (xai-org/grok-1), opened as it is: ``ckpt-0/tensor{i:05d}_000``.

The layout, from xai-org/grok-1's ``checkpoint.py`` and ``model.py``:
  * one pickle per Haiku parameter, ``tensor{i:05d}_{host:03d}`` (host 0 on one machine), numbered in
    the order ``jax.tree_util`` flattens ``TrainingState(params)``: module paths sorted as strings
    (``decoder_layer_10`` before ``decoder_layer_2``), one parameter per module;
  * 12 per decoder layer (4 RMSNorm scales, query/key/value/output projections, the router, the
    three expert projections) and 2 more (the embedding, the final norm): 770 for 64 layers;
  * attention and expert weights are ``__main__.QuantizedWeight8bit(weight, scales)`` records:
    int8 ``[in, out]`` (experts ``[E, in, out]``) and bf16 per-output-channel scales ``[1, out]``
    (``[E, 1, out]``); the embedding, norms and router are float32 arrays;
  * ``tokenizer.model`` (SentencePiece) beside ``checkpoints/``.

Renaming into our ``model_torch.grok`` names is a table (``GROK_RENAMES``), as grok-1's own restore
has rename rules; the int8 weights stay int8 (our ``--quantize int8`` layout: ``weight`` [out, in]
+ ``scale`` [out]). The configuration is grok-1's constants with the widths, layer, head and expert
counts read from the tensors' shapes.

Pickles can run code. ``SafeUnpickler`` admits only array reconstruction, the dtypes involved and the
one record class; anything else is refused with the file named (``CheckpointError``: exit 2).
"""

from __future__ import annotations

import io
import pickle
import re
import sys
from pathlib import Path

import numpy as np

from bridge.errors import CheckpointError
from bridge.stored import Recent, StoredWeights, check_keys

CKPT_DIR = "ckpt-0"
PER_LAYER = 12
HEAD_DIM = 128  # grok-1's key_size; the head count is the projection width over it


def tensor_file(directory: Path, index: int, host: int = 0) -> Path:
    return Path(directory) / f"tensor{index:05d}_{host:03d}"


class QuantizedWeight8bit:
    """grok-1's record: ``weight`` (int8) and ``scales``; ``weight.astype(scales.dtype) * scales``."""

    def __init__(self, weight=None, scales=None):
        self.weight, self.scales = weight, scales

    def __setstate__(self, state):
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            raise pickle.UnpicklingError(f"a QuantizedWeight8bit holds weight and scales, not {state!r:.80}")
        self.weight, self.scales = state["weight"], state["scales"]

    @property
    def shape(self):
        return self.weight.shape


# -- reading pickles safely ------------------------------------------------------------------------------
def _allowed_globals() -> dict:
    import ml_dtypes

    from numpy._core import multiarray

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,  # numpy 1.x pickles
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,  # protocol 2 writes bytes as encode(str, "latin1")
        ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
        ("model", "QuantizedWeight8bit"): QuantizedWeight8bit,
    }
    for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        allowed[("ml_dtypes", name)] = getattr(ml_dtypes, name)
    return allowed


def _latin1_encode(text, encoding="latin1", errors="strict"):
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is admitted only for protocol 2's latin1 bytes")
    return text.encode("latin1", errors)


ARRAY_DTYPES = ("int8", "float32", "bfloat16", "float16")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays (of ``ARRAY_DTYPES``) and QuantizedWeight8bit records, and
    nothing else: every other global a pickle names (``os.system``, ``builtins.eval``, ...) is refused
    before it can be called."""

    allowed = None

    def find_class(self, module, name):
        allowed = type(self).allowed = type(self).allowed or _allowed_globals()
        found = allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}")
        return found


def _checked(obj, what: str):
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in ARRAY_DTYPES:
            raise pickle.UnpicklingError(f"{what} has dtype {obj.dtype}")
        return obj
    if isinstance(obj, QuantizedWeight8bit):
        _checked(obj.weight, what + ".weight"), _checked(obj.scales, what + ".scales")
        if obj.weight.dtype != np.int8:
            raise pickle.UnpicklingError(f"{what}.weight is {obj.weight.dtype}, not int8")
        return obj
    raise pickle.UnpicklingError(f"it holds a {type(obj).__module__}.{type(obj).__name__}, not an array")


def load_tensor(path: Path):
    """One ``tensor{i}_{host}`` file: a numpy array or a QuantizedWeight8bit, through ``SafeUnpickler``."""
    try:
        with open(path, "rb") as f:
            return _checked(SafeUnpickler(f).load(), "it")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: refused: {e}; a Grok-1 tensor file holds only numpy arrays and "
                              f"QuantizedWeight8bit records (is it from xai-org/grok-1's checkpoint?)") from None  # fmt: skip
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


# -- the tree order and the renaming table -------------------------------------------------------------
def haiku_paths(num_layers: int) -> list[str]:
    """Every parameter's ``module/param`` path in the order its file is numbered (sorted strings)."""
    layer = ["multi_head_attention/query/w", "multi_head_attention/key/w", "multi_head_attention/value/w",
             "multi_head_attention/linear/w", "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale",
             "rms_norm_3/scale", "router/w", "moe/linear/w", "moe/linear_v/w", "moe/linear_1/w"]  # fmt: skip
    paths = ["language_model/in_out_embed/embeddings", "language_model/rms_norm/scale"]
    paths += [f"transformer/decoder_layer_{i}/{p}" for i in range(num_layers) for p in layer]
    # jax flattens a dict by sorted keys: params[module][param], so the module path sorts first.
    return sorted(paths, key=lambda p: tuple(p.rsplit("/", 1)))


# (pattern on the Haiku path, our name(s), how): "as_is"; "linear": int8 [in, out] -> weight [out, in]
# + scale [out]; "t": a float [in, out] -> [out, in]; "experts_gate"/"experts_up": the halves of
# ``gate_up_proj`` [E, 2F, H]; "experts_down": ``down_proj`` [E, H, F].
L = r"^transformer/decoder_layer_(\d+)/"
GROK_RENAMES: list[tuple[str, str, str]] = [
    (r"^language_model/in_out_embed/embeddings$", "model.embed_tokens.weight", "as_is"),
    (r"^language_model/rms_norm/scale$", "model.norm.weight", "as_is"),
    (L + r"multi_head_attention/query/w$", r"model.layers.\1.self_attn.q_proj", "linear"),
    (L + r"multi_head_attention/key/w$", r"model.layers.\1.self_attn.k_proj", "linear"),
    (L + r"multi_head_attention/value/w$", r"model.layers.\1.self_attn.v_proj", "linear"),
    (L + r"multi_head_attention/linear/w$", r"model.layers.\1.self_attn.o_proj", "linear"),
    (L + r"rms_norm/scale$", r"model.layers.\1.pre_attn_norm.weight", "as_is"),
    (L + r"rms_norm_1/scale$", r"model.layers.\1.post_attn_norm.weight", "as_is"),
    (L + r"rms_norm_2/scale$", r"model.layers.\1.pre_moe_norm.weight", "as_is"),
    (L + r"rms_norm_3/scale$", r"model.layers.\1.post_moe_norm.weight", "as_is"),
    (L + r"router/w$", r"model.layers.\1.mlp.gate.weight", "t"),
    (L + r"moe/linear/w$", r"model.layers.\1.mlp.experts.gate_up_proj", "experts_gate"),
    (L + r"moe/linear_v/w$", r"model.layers.\1.mlp.experts.gate_up_proj", "experts_up"),
    (L + r"moe/linear_1/w$", r"model.layers.\1.mlp.experts.down_proj", "experts_down"),
]


def _rename(path: str) -> tuple[str, str]:
    for pattern, name, how in GROK_RENAMES:
        m = re.match(pattern, path)
        if m:
            return m.expand(name), how
    raise CheckpointError(f"no rename rule for Grok-1 parameter {path!r}; add one to GROK_RENAMES")


def find_ckpt(path: Path) -> Path | None:
    """The ``ckpt-0`` directory of ``path`` (the directory itself, or a ``ckpt-0`` inside it), or None."""
    path = Path(path)
    for d in (path, path / CKPT_DIR):
        if tensor_file(d, 0).is_file():
            return d
    return None


def find_tokenizer(ckpt: Path) -> Path | None:
    """grok-1 keeps ``tokenizer.model`` at its repository root, beside ``checkpoints/``."""
    for d in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (d / "tokenizer.model").is_file():
            return d / "tokenizer.model"
    return None


class SentencePieceTokenizer:
    """A SentencePiece ``tokenizer.model`` (grok-1 reads its own with ``sentencepiece`` too) with the
    parts of a transformers tokenizer generation uses: ``encode``, ``decode``, the special ids, no
    chat template. (transformers 5.23's converter turns such a file into a tokenizer that encodes
    nothing, so it is not used.)"""

    chat_template = None

    def __init__(self, path: Path):
        import sentencepiece

        self.path = Path(path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        ids = (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (i if i >= 0 else None for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        special = {self.bos_token_id, self.eos_token_id, self.pad_token_id} if skip_special_tokens else set()
        return self.sp.decode([int(i) for i in ids if int(i) not in special])

    def save_pretrained(self, directory) -> None:
        import shutil

        shutil.copyfile(self.path, Path(directory) / "tokenizer.model")


class GrokCheckpoint(StoredWeights):
    """A ``ckpt-0`` directory as ``StoredWeights`` in our names. Each file is unpickled once per tensor
    it feeds and kept in a small cache while the devices' slices of that tensor are read (the load's
    two workers: at most a few files' tensors in host memory besides the placed weights)."""

    def __init__(self, path: Path):
        ckpt = find_ckpt(path)
        if ckpt is None:
            raise CheckpointError(f"{path} holds no {CKPT_DIR}/tensor00000_000; pass grok-1's checkpoints/ directory")
        self.ckpt = ckpt
        self.label = f"placing {ckpt.name}"
        files = sorted(p.name for p in ckpt.iterdir() if re.fullmatch(r"tensor\d{5}_000", p.name))
        n = len(files)
        if n < 2 + PER_LAYER or (n - 2) % PER_LAYER or files[-1] != f"tensor{n - 1:05d}_000":
            raise CheckpointError(f"{ckpt} holds {n} tensor files numbered up to {files[-1] if files else '-'}; "
                                  f"Grok-1 has 12 per layer + 2, numbered from tensor00000_000 without gaps")  # fmt: skip
        self.num_layers = (n - 2) // PER_LAYER
        self.paths = haiku_paths(self.num_layers)
        # our name -> [(file index, part)]: part "weight" / "scale" of a QuantizedWeight8bit record,
        # or "as_is" / "t" (transposed) for a plain array; gate_up_proj has two sources (gate, up).
        self.sources: dict[str, list[tuple[int, str]]] = {}
        for i, p in enumerate(self.paths):
            name, how = _rename(p)
            if how == "linear" or how.startswith("experts_"):
                weight, scale = (name + ".weight", name + ".scale") if how == "linear" else (name, name + "_scale")
                self.sources.setdefault(weight, []).append((i, "weight"))
                self.sources.setdefault(scale, []).append((i, "scale"))
            else:
                self.sources.setdefault(name, []).append((i, how))
        # gate_up reads two files; one more overlaps the next tensor. The whole tensors in our layout:
        # the loader's two in flight.
        self._files, self._whole_tensors = Recent(3), Recent(2)
        self._expected: dict = {}  # our name -> the model's shape, checked as each tensor is read

    def file(self, index: int):
        return self._files.get(index, lambda i: load_tensor(tensor_file(self.ckpt, i)))

    def config(self):
        """``GrokConfig``: grok-1's constants, the sizes read from the embedding, query, key and expert
        shapes."""
        from model_torch.grok import GrokConfig

        embed = self.file(self.paths.index("language_model/in_out_embed/embeddings"))
        q = self.file(self.paths.index("transformer/decoder_layer_0/multi_head_attention/query/w"))
        k = self.file(self.paths.index("transformer/decoder_layer_0/multi_head_attention/key/w"))
        up = self.file(self.paths.index("transformer/decoder_layer_0/moe/linear_v/w"))
        vocab, hidden = embed.shape
        for what, w in (("query", q), ("key", k)):
            if w.shape[1] % HEAD_DIM:
                raise CheckpointError(f"{self.ckpt}: the {what} projection's width {w.shape[1]} is not a whole "
                                      f"number of grok-1's {HEAD_DIM}-wide heads")  # fmt: skip
        experts, _, ffn = up.shape
        return GrokConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=self.num_layers,
                          num_heads=q.shape[1] // HEAD_DIM, num_kv_heads=k.shape[1] // HEAD_DIM, head_dim=HEAD_DIM,
                          num_experts=experts)  # fmt: skip

    def _whole(self, name: str) -> np.ndarray:
        return self._whole_tensors.get(name, self._assemble)

    def _assemble(self, name: str) -> np.ndarray:
        """Our tensor ``name`` from its file(s): int8 [.., in, out] -> [.., out, in], scales
        [.., 1, out] -> [.., out], a router [in, out] -> [out, in]; gate and up concatenated."""
        parts = []
        for index, part in self.sources[name]:
            obj, where = self.file(index), f"{tensor_file(self.ckpt, index)} ({self.paths[index]})"
            if isinstance(obj, QuantizedWeight8bit) != (part in ("weight", "scale")):
                raise CheckpointError(f"{where} should hold {'a QuantizedWeight8bit' if part in ('weight', 'scale') else 'a plain array'}; "
                                      f"only attention and expert weights are quantized")  # fmt: skip
            if part == "scale":
                w = obj.scales
                if w.shape[-2] != 1 or w.shape[-1] != obj.weight.shape[-1]:
                    raise CheckpointError(f"{where}: scales {list(w.shape)} are not per output channel of weight "
                                          f"{list(obj.weight.shape)}")  # fmt: skip
                parts.append(w.reshape(*w.shape[:-2], w.shape[-1]))
            elif part == "weight":
                parts.append(np.swapaxes(obj.weight, -1, -2))
            else:
                parts.append(obj.T if part == "t" else obj)
        # the output channels: rows of a weight, the last dim of a scale
        whole = np.ascontiguousarray(np.concatenate(parts, axis=-1 if part == "scale" else -2) if len(parts) > 1 else parts[0])
        want = self._expected.get(name)
        if want is not None and tuple(whole.shape) != want:
            files = ", ".join(tensor_file(self.ckpt, i).name for i, _ in self.sources[name])
            raise CheckpointError(f"shape mismatch for {name} (from {files}): checkpoint {list(whole.shape)}, "
                                  f"model {list(want)}")  # fmt: skip
        return whole

    def check(self, model, names) -> None:
        """Names now; each shape when its file is read (reading every file to check shapes first would
        read the whole checkpoint twice)."""
        self._expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(self._expected, {k: self._expected.get(k, ()) for k in self.sources})

    def shapes(self):
        return {name: self._whole(name).shape for name in self.sources}

    def read(self, name, index=()):
        return self._whole(name)[tuple(index)]


# -- writing (tests and fixtures: the published layout at any size) -------------------------------------
def write_ckpt(model, directory: Path) -> Path:
    """Writes an int8 ``model_torch`` Grok (``quantize_int8(model, embeddings=False)``) as grok-1's
    ``ckpt-0``: one pickle per Haiku parameter in tree order, attention and expert weights as
    ``__main__.QuantizedWeight8bit`` records of int8 ``[in, out]`` and bf16 ``[1, out]`` scales."""
    import ml_dtypes

    from bridge.files import atomic_directory

    state = {k: v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy()
             for k, v in model.state_dict().items()}  # fmt: skip
    ffn = model.config.intermediate_size

    def record(weight, scale):
        return QuantizedWeight8bit(np.ascontiguousarray(np.swapaxes(weight, -1, -2)),
                                   scale[..., None, :].astype(ml_dtypes.bfloat16))  # fmt: skip

    def value(path: str):
        name, how = _rename(path)
        if how == "as_is":
            return state[name].astype(np.float32)
        if how == "t":
            return np.ascontiguousarray(state[name].T).astype(np.float32)
        if how == "linear":
            return record(state[name + ".weight"], state[name + ".scale"])
        if how == "experts_down":
            return record(state[name], state[name + "_scale"])
        half = slice(0, ffn) if how == "experts_gate" else slice(ffn, 2 * ffn)
        return record(state[name][:, half], state[name + "_scale"][:, half])

    main = sys.modules["__main__"]
    had = getattr(main, "QuantizedWeight8bit", None)
    QuantizedWeight8bit.__module__ = "__main__"  # what grok-1's pickles name
    main.QuantizedWeight8bit = QuantizedWeight8bit
    directory = Path(directory)
    try:
        with atomic_directory(directory / CKPT_DIR) as tmp:
            for i, path in enumerate(haiku_paths(model.config.num_layers)):
                buf = io.BytesIO()
                pickle.dump(value(path), buf)
                tensor_file(tmp.path, i).write_bytes(buf.getvalue())
            tmp.commit()
    finally:
        QuantizedWeight8bit.__module__ = __name__
        if had is None:
            del main.QuantizedWeight8bit
        else:
            main.QuantizedWeight8bit = had
    return directory
