"""Reading compiled programs: collectives (count and bytes per kind) and per-device memory, from
the optimized HLO text and XLA's memory analysis of a ``jit(...).lower(...).compile()`` result."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1,
}  # fmt: skip
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|\w+\[[^\]]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(",
    re.M,
)
_ARRAY = re.compile(r"(\w+)\[([^\]]*)\]")


def _shape_bytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        n = math.prod(int(d) for d in dims.split(",") if d.strip()) if dims.strip() else 1
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*?body=%?([\w.\-]+).*?known_trip_count\W+n\W+(\d+)")


def _trip_multipliers(hlo_text: str) -> list[tuple[str, int]]:
    """(computation text, how many times it runs per call of the module): a ``while`` body with a
    known trip count (a scanned layer stack) runs that many times its caller's count; every other
    computation once."""
    blocks, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if name is None and m:
            name, lines = m.group(1), []
        elif name is not None and line.startswith("}"):
            blocks[name], name = "\n".join(lines), None
        elif name is not None:
            lines.append(line)
    mult = {n: 1 for n in blocks}
    for _ in range(8):  # nested loops: a few passes settle it
        changed = False
        for n, text in blocks.items():
            for body, trips in _WHILE.findall(text):
                want = mult[n] * int(trips)
                if body in mult and mult[body] != want:
                    mult[body], changed = want, True
        if not changed:
            break
    return [(text, mult[n]) for n, text in blocks.items()] or [(hlo_text, 1)]


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collectives per run of an optimized HLO module by kind: ``{kind: {"count": n, "bytes":
    result bytes}}``. Async pairs (``all-reduce-start``/``-done``) count once; bytes are each op's
    result size per device; ops in a loop body with a known trip count (a scanned layer stack)
    count once per iteration."""
    out = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
    for text, times in _trip_multipliers(hlo_text):
        for m in _INSTR.finditer(text):
            shape = m.group("shape")
            if m.group("start") and shape.startswith("("):  # start ops return (operands, results, ...)
                parts = _ARRAY.findall(shape)
                shape = " ".join(f"{d}[{s}]" for d, s in parts[len(parts) // 2 :])
            out[m.group("op")]["count"] += times
            out[m.group("op")]["bytes"] += times * _shape_bytes(shape)
    return out


def collective_instructions(hlo_text: str) -> list[tuple[str, str]]:
    """(kind, result shape) of each collective, in program order."""
    return [(m.group("op"), m.group("shape")) for m in _INSTR.finditer(hlo_text)]


def compiled_stats(compiled) -> dict[str, Any]:
    """Collectives and per-device memory of a ``jit(...).lower(...).compile()`` result."""
    mem = compiled.memory_analysis()
    memory = {}
    if mem is not None:
        for field in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            memory[field] = int(getattr(mem, field, 0))
        memory["peak_bytes"] = (
            memory["argument_size_in_bytes"]
            + memory["output_size_in_bytes"]
            + memory["temp_size_in_bytes"]
            - memory["alias_size_in_bytes"]
        )
    return {"collectives": collectives(compiled.as_text()), "memory": memory}


def format_collectives(colls: Mapping[str, Mapping[str, int]]) -> str:
    parts = [f"{k} x{v['count']} ({v['bytes']:,} B)" for k, v in colls.items() if v["count"]]
    return ", ".join(parts) if parts else "none"

