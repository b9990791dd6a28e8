"""Experiments: sharding schemes side by side (``compare``) on one model, in one process."""

from __future__ import annotations

import csv
import dataclasses
import statistics
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

import sharding
from bridge import hlo
from bridge import programs
from bridge.errors import UsageError
from bridge.files import atomic_write
from bridge.lift import LiftedModule, lift


@dataclasses.dataclass
class Row:
    scheme: str
    mesh: str
    status: str = "ok"
    compile_s: float = float("nan")
    step_ms_median: float = float("nan")
    step_ms_min: float = float("nan")
    step_ms_max: float = float("nan")
    param_bytes_per_device: int = 0
    grad_bytes_per_device: int = 0  # train mode: gradients, placed like the parameters
    optimizer_bytes_per_device: int = 0  # train mode: AdamW's two moments
    peak_bytes_per_device: int = 0
    all_reduce: int = 0
    all_gather: int = 0
    reduce_scatter: int = 0
    all_to_all: int = 0
    collective_permute: int = 0
    collective_bytes: int = 0
    max_rel_diff: float = float("nan")


OUTPUT_FILES = ("compare.csv", "compare.md", "compare.png")
DEFAULT_SCHEMES = ("replicated", "tp", "fsdp", "dp", "dp_tp")


def fit_problem(model, scheme, devices, mesh=None, fallback="error") -> Optional[str]:
    """Why ``scheme`` cannot place ``model`` on these devices (None if it can), checked on names
    and shapes alone: nothing is placed."""
    from bridge.weight_plan import plan_weights

    scheme = sharding.get_scheme(scheme)
    try:
        sizes = scheme.mesh_shape(len(devices), {k: v for k, v in (mesh or {}).items() if k in scheme.axis_names})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan_weights(model, sizes, scheme, fallback=fallback)
    except sharding.ShardingError as e:
        return str(e)
    return None


def default_schemes(model, devices, mesh=None, fallback="error") -> tuple[list[str], list[tuple[str, str]]]:
    """(the default schemes that fit ``model`` on ``devices``, [(left-out scheme, why)])."""
    fit, left_out = [], []
    for name in DEFAULT_SCHEMES:
        why = fit_problem(model, name, devices, mesh, fallback)
        (left_out.append((name, why)) if why else fit.append(name))
    return fit, left_out


def run_scheme(model, scheme_name, devices, mode, batch, seq, repeats, reference=None, fallback="error", mesh=None,
               scan_layers: bool | None = None, lifted=None, stored=None) -> tuple[Row, Optional[np.ndarray]]:  # fmt: skip
    """One row: ``model`` lifted under ``scheme_name`` on ``devices`` (``lifted``: already lifted so;
    ``stored``: the weights' source when ``model`` is on the meta device)."""
    scheme = sharding.get_scheme(scheme_name)
    try:
        overrides = {k: v for k, v in (mesh or {}).items() if k in scheme.axis_names}
        mesh = sharding.mesh_for(scheme, len(devices), overrides, devices=devices)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if lifted is None:
                lifted = lift(model, mesh, scheme, fallback=fallback, scan_layers=scan_layers, stored=stored)
            mesh = lifted.mesh
    except sharding.ShardingError as e:
        return Row(scheme.name, "-", status=f"does not fit: {e}"), None
    state_bytes = {}
    if mode == "train":
        from bridge import train

        try:
            train.check_trainable(lifted)
        except UsageError as e:
            return Row(scheme.name, "-", status=f"cannot train: {e}"), None
        fn, args, state_bytes = train.step_program(lifted, batch, seq)
    else:
        fn, args = programs.step_program(lifted, mode, batch, seq)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    stats = hlo.compiled_stats(compiled)
    times, out, first_loss = [], None, None
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        if mode == "train":  # the step donated its state: the next step takes the one it returned
            first_loss = out[1] if first_loss is None else first_loss
            args = (out[0], args[1])
        else:
            args = programs.next_args(mode, args, out)
        if i:  # the first run warms caches
            times.append((time.perf_counter() - t0) * 1000)
    if mode == "train":
        out = first_loss  # compared across schemes: the first step's loss
    logits = sharding.to_host(out if mode in ("forward", "train") else out[0])
    c = stats["collectives"]
    row = Row(
        scheme.name,
        ",".join(f"{k}={v}" for k, v in mesh.shape.items()),
        compile_s=compile_s,
        step_ms_median=statistics.median(times),
        step_ms_min=min(times),
        step_ms_max=max(times),
        param_bytes_per_device=lifted.report()["param_bytes_per_device"],
        grad_bytes_per_device=state_bytes.get("grads", 0),
        optimizer_bytes_per_device=state_bytes.get("optimizer", 0),
        peak_bytes_per_device=stats["memory"].get("peak_bytes", 0),
        all_reduce=c["all-reduce"]["count"],
        all_gather=c["all-gather"]["count"],
        reduce_scatter=c["reduce-scatter"]["count"],
        all_to_all=c["all-to-all"]["count"],
        collective_permute=c["collective-permute"]["count"],
        collective_bytes=sum(v["bytes"] for v in c.values()),
    )
    if reference is not None:
        row.max_rel_diff = float(np.abs(logits - reference).max() / np.abs(reference).max())
    return row, logits


def compare(
    model,
    schemes: Sequence[str],
    devices,
    mode: str = "forward",
    batch: int = 8,
    seq: int = 64,
    repeats: int = 5,
    fallback: str = "error",
    mesh=None,
    progress=None,
    scan_layers: bool | None = None,
) -> list[Row]:
    """One row per scheme (a scheme that does not fit is a row that says why); max_rel_diff is
    against the unsharded run on one device. ``model``: a module, or a ``Lifted`` on one device,
    replicated (``open_model(..., devices=1, scheme="replicated")``), then that is the reference run
    and its weights are released after it. ``progress(line)`` hears of each scheme as it
    goes: a scheme can take minutes to compile on a real model. ``scan_layers``: each scheme runs the
    scanned decoder stack (the reference stays unrolled)."""
    say = progress or (lambda line: None)
    t0 = time.perf_counter()
    say(f"[reference] replicated on 1 device: compiling and running {mode} ...")
    opened = model if isinstance(model, LiftedModule) else None
    model = opened.model if opened is not None else model
    stored = opened.stored if opened is not None else None
    ref_row, reference = run_scheme(model, "replicated", devices[:1], mode, batch, seq, 1, lifted=opened)
    if opened is not None:
        opened.weights = {}  # consumed: the one-device copy is not held while the schemes run
    say(f"[reference] done in {time.perf_counter() - t0:.1f} s")
    rows = []
    for i, name in enumerate(schemes, 1):
        t0 = time.perf_counter()
        say(f"[{i}/{len(schemes)}] {name}: placing, compiling, {repeats} timed runs ...")
        row, _ = run_scheme(model, name, devices, mode, batch, seq, repeats, reference, fallback, mesh, scan_layers,
                            stored=stored)
        rows.append(row)
        verdict = "done" if row.status == "ok" else "does not fit"
        say(f"[{i}/{len(schemes)}] {name}: {verdict} in {time.perf_counter() - t0:.1f} s")
    return rows


def write_outputs(rows: list[Row], out: Path, title: str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = [f.name for f in dataclasses.fields(Row)]
    with atomic_write(out / "compare.csv", "w") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))
    with atomic_write(out / "compare.md", "w") as fh:
        fh.write(format_markdown(rows, title))
    plot(rows, out / "compare.png", title)
    return {"csv": out / "compare.csv", "md": out / "compare.md", "png": out / "compare.png"}


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes else "-"  # "-": not a training step


def format_markdown(rows: list[Row], title: str) -> str:
    head = ("| scheme | mesh | compile s | step ms (median [min, max]) | params/device | grads + optimizer/device | "
            "peak/device | all-reduce | all-gather | reduce-scatter | all-to-all | coll. bytes | max rel diff |")  # fmt: skip
    lines = [f"# {title}", "", head, "|" + " --- |" * 13]
    for r in rows:
        if r.status != "ok":
            status = r.status.replace("|", "\\|")  # rule regexes hold pipes
            lines.append(f"| {r.scheme} | {r.mesh} | {status} |" + " |" * 10)
            continue
        lines.append(
            f"| {r.scheme} | {r.mesh} | {r.compile_s:.2f} | {r.step_ms_median:.2f} [{r.step_ms_min:.2f}, "
            f"{r.step_ms_max:.2f}] | {r.param_bytes_per_device / 1e6:.2f} MB | "
            f"{_mb(r.grad_bytes_per_device + r.optimizer_bytes_per_device)} | {r.peak_bytes_per_device / 1e6:.2f} MB | "
            f"{r.all_reduce} | {r.all_gather} | {r.reduce_scatter} | {r.all_to_all} | {r.collective_bytes:,} | "
            f"{r.max_rel_diff:.1e} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Every scheme keeps its slot; one that does not fit gets no bar and says so in its slot.
    names = [r.scheme for r in rows]
    x = np.arange(len(rows))
    val = lambda r, v: v if r.status == "ok" else 0.0  # noqa: E731
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.bar(x, [val(r, r.step_ms_median) for r in rows], color="#4C72B0",
          yerr=[[val(r, r.step_ms_median - r.step_ms_min) for r in rows],
                [val(r, r.step_ms_max - r.step_ms_median) for r in rows]], capsize=4)  # fmt: skip
    a.set_xticks(x, names)
    a.set_ylabel("warm step time (ms, median; bars: min-max)")
    a.set_xlabel("sharding scheme")
    a.set_title("step time")
    width = 0.38
    state = [val(r, (r.param_bytes_per_device + r.grad_bytes_per_device + r.optimizer_bytes_per_device) / 2**20) for r in rows]
    label = "parameters + gradients + optimizer" if any(r.optimizer_bytes_per_device for r in rows) else "parameters"
    b.bar(x - width / 2, state, width, label=label)
    b.bar(x + width / 2, [val(r, r.peak_bytes_per_device / 2**20) for r in rows], width, label="peak (compiled program)")
    for ax in (a, b):
        for i, r in enumerate(rows):
            if r.status != "ok":
                ax.text(i, 0, "does not fit", rotation=90, ha="center", va="bottom", color="#C44E52")
    b.set_xticks(x, names)
    b.set_ylabel("MiB per device")
    b.set_xlabel("sharding scheme")
    b.set_title("memory per device")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
