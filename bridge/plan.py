"""Plan before you buy: per-device memory and communication of a model on a mesh, with no weight
ever allocated.

The model is built on torch's meta device, lifted with torchax (``extract_fn``: shapes only), its
placements resolved and validated by the scheme's rule table, and its forward (or one decode step
with its KV cache) lowered and compiled for the mesh with abstract inputs
(``jax.ShapeDtypeStruct`` carrying shardings).

Unrolled, compile time grows with depth, so the plan compiles the model with 1 and 2 layers and
extrapolates linearly to the full depth (every decoder layer is identical). Scanned
(``--scan-layers``), the whole model compiles once, so temporaries and collectives are exact.
Parameter and KV-cache bytes are always exact, computed from the full model's placements. The
output says which figures are extrapolated.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import model_torch
import sharding
from bridge import hlo, kv_cache, programs, quantize, scan, weight_plan
from bridge.extract import extract_fn
from bridge.lift import Lifted, lifted_from_plan

# Published figures, per chip (approximate; dense bf16). The estimate is a roofline, not a benchmark.
ACCELERATORS = {
    "H100": {"memory_bytes_per_s": 3.35e12, "bf16_flops": 989e12, "interconnect_bytes_per_s": 450e9, "memory": 80 * 2**30},
    "H200": {"memory_bytes_per_s": 4.8e12, "bf16_flops": 989e12, "interconnect_bytes_per_s": 450e9, "memory": 141 * 2**30},
    "TPU v5e": {"memory_bytes_per_s": 0.819e12, "bf16_flops": 197e12, "interconnect_bytes_per_s": 200e9, "memory": 16 * 2**30},
    "TPU v5p": {"memory_bytes_per_s": 2.765e12, "bf16_flops": 459e12, "interconnect_bytes_per_s": 600e9, "memory": 95 * 2**30},
}  # fmt: skip



def meta_model(preset_or_config, dtype: str = "bfloat16", num_layers: Optional[int] = None):
    """A model on the meta device: a preset name, (model_torch class, config[, hf config whose int8
    mark says how it is stored]), or a transformers config (a family without a model_torch rewrite:
    transformers' own class behind the adapter)."""
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    stored_as = ()
    if isinstance(preset_or_config, str):
        cls, config = model_torch.PRESETS[preset_or_config]
    elif isinstance(preset_or_config, tuple):
        cls, config, *stored_as = preset_or_config  # (cls, config[, the hf config of a stored layout])
    else:
        from bridge import checkpoints

        model = checkpoints.meta_transformers_model(preset_or_config, torch_dtype, num_layers)
        cls = None
    if cls is not None:
        if num_layers is not None:
            config = dataclasses.replace(config, num_layers=num_layers)
        with torch.device("meta"):
            model = cls(config).to(torch_dtype)
    if cls is not None and stored_as:
        from bridge import checkpoints

        checkpoints.as_stored(model, stored_as[0])  # e.g. Grok-1's ckpt-0: int8 but the embedding
    if dtype == "int8" and not any(b.dtype == torch.int8 for b in model.buffers()):
        quantize.quantize_int8(model)
    return model.eval()


def abstract_lifted(model, mesh, scheme, fallback: str, scan_layers: bool | None = None) -> Lifted:
    """``model`` (on the meta device) lifted with abstract weights: each a ``ShapeDtypeStruct``
    carrying its placement, validated by the scheme like a real one. Nothing is allocated.
    ``scan_layers``: the stacked layout of ``bridge.scan`` (one scan over the layers)."""
    scan_layers = scan.scans(model, scan_layers)
    plan = weight_plan.plan_weights(model, dict(mesh.shape), scheme, fallback=fallback, scan_layers=scan_layers)
    _, fn = extract_fn(model)
    return lifted_from_plan(model, fn, weight_plan.abstract_weights(plan, mesh), mesh, plan)


def abstract_program(model, mesh, scheme, mode: str, batch: int, seq: int, fallback: str,
                     scan_layers: bool | None = None):
    """(placements, compiled program) of the forward / one decode step over abstract sharded inputs:
    the same program ``compare`` and ``profile`` run (``programs.step_program``)."""
    lifted = abstract_lifted(model, mesh, scheme, fallback, scan_layers)
    program, args = programs.step_program(lifted, mode, batch, seq, abstract=True)
    return lifted.placements, program.lower(*args).compile()


def _flops(stage) -> float:
    cost = (stage.cost_analysis() or {}) if hasattr(stage, "cost_analysis") else {}
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def plan(
    preset_or_config,
    mesh,
    scheme="tp",
    *,
    dtype: str = "bfloat16",
    mode: str = "decode",
    batch: int = 1,
    seq: int = 2048,
    fallback: str = "error",
    probe_layers: tuple[int, int] = (1, 2),
    device_memory: Optional[int] = None,
    scan_layers: bool | None = None,
) -> dict:
    """Per-device memory, collectives and a roofline step estimate. Unrolled, the model is compiled
    at ``probe_layers`` depths and extrapolated; scanned (``scan_layers``), it is compiled once at
    full depth: temporaries and collectives exact (a loop body's collectives count once per layer),
    and only the FLOPs extrapolated from 1- and 2-layer compiles (XLA's cost analysis counts a loop
    body once)."""
    scheme = sharding.get_scheme(scheme)
    full = meta_model(preset_or_config, dtype)
    # The layout ``generate`` runs on this backend (bf16 on CPU and any GPU unroll): the temporaries
    # are this backend's compiler's, so they describe the program that would run. The scanned bf16
    # stack on XLA:CPU converts whole stacked tensors (Llama-3-8B: 27 GiB of temporaries against
    # 0.25 GiB unrolled); ``--scan-layers`` still plans it.
    scan_layers = scan.scans(full, scan_layers)
    num_layers = len(full.decoder_layers())
    mesh_shape = dict(mesh.shape)
    lifted = abstract_lifted(full, mesh, scheme, fallback, scan_layers)
    placements = lifted.placements
    rep = lifted.report()
    # The cache's bytes per device, from the same layout the decode program uses.
    kv_bytes = kv_cache.bytes_per_device(lifted, batch, seq) if mode == "decode" else 0

    exact = scan_layers or num_layers <= max(probe_layers)
    probes = (num_layers,) if exact else probe_layers
    measured = {}
    for n in probes:
        model = full if scan_layers else meta_model(preset_or_config, dtype, n)
        _, compiled = abstract_program(model, mesh, scheme, mode, batch, seq, fallback, scan_layers)
        stats = hlo.compiled_stats(compiled)
        measured[n] = {
            "collectives": stats["collectives"],
            "temp_bytes": stats["memory"].get("temp_size_in_bytes", 0),
            "flops": _flops(compiled),
        }
    flops_note = None
    if scan_layers and num_layers > 1:
        # XLA's cost analysis counts a loop body once: FLOPs come from 1- and 2-layer unrolled
        # compiles, scaled (the lowered, unoptimized programs count converts and layout ops as well,
        # 6x more for grok-1).
        f1, f2 = (_flops(abstract_program(meta_model(preset_or_config, dtype, n), mesh, scheme, mode, batch, seq,
                                          fallback, scan_layers=False)[1]) for n in (1, 2))  # fmt: skip
        measured[num_layers]["flops"] = f1 + (f2 - f1) * (num_layers - 1)
        flops_note = "FLOPs extrapolated from 1- and 2-layer compiles"

    def scaled(get):
        if exact:
            return get(measured[num_layers])
        (l1, l2) = probes
        per_layer = (get(measured[l2]) - get(measured[l1])) / (l2 - l1)
        return get(measured[l1]) + per_layer * (num_layers - l1)

    collectives = {
        kind: {
            "count": round(scaled(lambda m: m["collectives"][kind]["count"])),
            "bytes": round(scaled(lambda m: m["collectives"][kind]["bytes"])),
        }
        for kind in hlo.COLLECTIVES
    }
    temp = round(scaled(lambda m: m["temp_bytes"]))
    flops = scaled(lambda m: m["flops"])  # per device (SPMD program)
    param = rep["param_bytes_per_device"]
    total = param + kv_bytes + temp
    coll_bytes = sum(v["bytes"] for v in collectives.values())
    estimates = {}
    for name, acc in ACCELERATORS.items():
        t_mem = (param + kv_bytes) / acc["memory_bytes_per_s"]
        t_flops = flops / acc["bf16_flops"]
        t_comm = coll_bytes / acc["interconnect_bytes_per_s"]
        estimates[name] = {
            "step_seconds": max(t_mem, t_flops) + t_comm,
            "memory_seconds": t_mem,
            "compute_seconds": t_flops,
            "collective_seconds": t_comm,
            "fits": total <= (device_memory or acc["memory"]),
        }
    return {
        "model": preset_or_config if isinstance(preset_or_config, str) else type(getattr(full, "hf", full)).__name__,  # the adapter: the class it wraps
        "parameters": model_torch.common.count_parameters(full),
        "scheme": scheme.name,
        "mesh": mesh_shape,
        "dtype": dtype,
        "mode": mode,
        "batch": batch,
        "seq": seq,
        "param_bytes_per_device": param,
        "param_bytes_total": rep["param_bytes_total"],
        "kv_cache_bytes_per_device": kv_bytes,
        "temp_bytes_per_device": temp,
        "total_bytes_per_device": total,
        "collectives": collectives,
        "flops_per_device": flops,
        "device_memory": device_memory,
        "fits_device_memory": None if device_memory is None else total <= device_memory,
        "fits_without_temporaries": None if device_memory is None else param + kv_bytes <= device_memory,
        "estimates": estimates,
        "extrapolated": None if exact else f"compiled {probes[0]} and {probes[1]} layers, scaled to {num_layers}",
        "scan_layers": scan_layers,
        "compiled": f"the whole model once ({num_layers} layers, scanned)" if scan_layers else (
            f"the whole model ({num_layers} layers)" if exact else f"{probes[0]} and {probes[1]} layers"),
        "flops_note": flops_note,
        "fallbacks": sharding.fallback_summary(placements),
        "decodes_by_recomputing": full.recompute_reason,
    }


def format_plan(p: dict) -> str:
    gib = lambda b: f"{b / 2**30:,.2f} GiB"  # noqa: E731
    lines = [
        f"plan: {p['model']} ({p['parameters'] / 1e9:,.1f}B parameters), {p['dtype']}, scheme {p['scheme']}, "
        f"mesh {','.join(f'{k}={v}' for k, v in p['mesh'].items())}, {p['mode']} batch {p['batch']} seq {p['seq']}",
        f"per device: parameters {gib(p['param_bytes_per_device'])} | KV cache {gib(p['kv_cache_bytes_per_device'])} | "
        f"temporaries {gib(p['temp_bytes_per_device'])} | total {gib(p['total_bytes_per_device'])}",
        f"collectives per step: {hlo.format_collectives(p['collectives'])}",
    ]
    if p["device_memory"]:
        verdict = "fits" if p["fits_device_memory"] else "does NOT fit"
        base = "fit" if p["fits_without_temporaries"] else "do NOT fit"
        lines.append(f"{verdict} in {gib(p['device_memory'])} per device with temporaries; parameters + KV cache "
                     f"alone {base} (temporaries come from an XLA:CPU compile, whose layout copies of large "
                     f"weights an accelerator compile may not make)")
    lines.append("roofline estimate of one step (a model, not a measurement):")
    lines.append(f"  {'device':<8} {'step ms':>9} {'memory ms':>10} {'compute ms':>11} {'collect. ms':>12} {'fits':>5}")
    for name, e in p["estimates"].items():
        lines.append(f"  {name:<8} {e['step_seconds'] * 1e3:>9.2f} {e['memory_seconds'] * 1e3:>10.2f} "
                     f"{e['compute_seconds'] * 1e3:>11.2f} {e['collective_seconds'] * 1e3:>12.2f} {str(e['fits']):>5}")  # fmt: skip
    if p["extrapolated"]:
        lines.append(f"note: temporaries, collectives and FLOPs extrapolated ({p['extrapolated']}); parameter and KV bytes exact")
    elif p.get("scan_layers"):
        lines.append(f"note: compiled {p['compiled']}: temporaries and collectives exact; {p['flops_note'] or 'FLOPs exact'}")
    lines += [f"note: {f}" for f in p["fallbacks"]]
    if p.get("decodes_by_recomputing"):
        lines.append(f"note: decodes by recomputing its token history ({p['decodes_by_recomputing']}): a decode step is a "
                     f"forward over all {p['seq']} columns")  # fmt: skip
    return "\n".join(lines)


def parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    num = text.strip().lower().rstrip()
    i = len(num)
    while i and not (num[i - 1].isdigit() or num[i - 1] == "."):
        i -= 1
    value, unit = num[:i], num[i:].strip()
    if not value or unit not in units:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GiB or 16GB")
    return int(float(value) * units[unit])
