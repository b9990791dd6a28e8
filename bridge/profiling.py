"""Profiling: trace steps with ``jax.profiler.trace`` into TensorBoard/xprof, with model layers named.

Layer names: while the step function is traced, a forward hook on each torch submodule opens
``jax.named_scope(<module path>)``, so every HLO op carries ``.../layers.3.self_attn/...`` in its
metadata; TensorBoard's profile plugin shows those names, and ``summarize`` joins the trace's
per-op events with them to report time per layer.

The xplane is read as protobuf (XSpace, and the HloProto the profiler stores beside the trace);
the message schemas below declare only the fields used here.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import jax

from bridge import hlo

# Reading a trace without its model at hand: scopes named like ``layers.3`` / ``layers.3.mlp``.
# ``profile`` passes the model's own ``named_blocks()`` names instead.
LAYER_PATTERN = re.compile(r"((?:model\.|gpt_neox\.)?layers\.\d+)(\.(?:self_attn|attention|mlp))?")


def named_blocks(model) -> list:
    """(scope name, module) of the blocks a profile names: a causal LM's own ``named_blocks()``
    (decoder layers and their attention and MLP blocks); for any other module, every submodule
    that has submodules (``blocks.3``, ``blocks.3.attn``), leaves being too fine to read."""
    from bridge.lift import is_causal_lm

    if is_causal_lm(model):
        return model.named_blocks()
    return [(n, m) for n, m in model.named_modules() if n and any(True for _ in m.children())]


@contextlib.contextmanager
def named_modules_scope(model) -> Iterator[None]:
    """While active, each of the model's ``named_blocks`` runs inside ``jax.named_scope(its name)``."""
    handles, open_scopes = [], {}
    for short, module in named_blocks(model):

        def pre(mod, args, short=short):
            cm = jax.named_scope(short)
            cm.__enter__()
            open_scopes.setdefault(id(mod), []).append(cm)

        def post(mod, args, out):
            open_scopes[id(mod)].pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------
# Reading an .xplane.pb
# ---------------------------------------------------------------------------------------------------
def _messages():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name="torchax_bridge_xplane.proto", package="tbx", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name, *fields):
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                fd.type_name = f".tbx.{type_name}"
        return m

    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    msg("XStat", ("metadata_id", 1, T.TYPE_INT64, opt, None), ("double_value", 2, T.TYPE_DOUBLE, opt, None),
        ("uint64_value", 3, T.TYPE_UINT64, opt, None), ("int64_value", 4, T.TYPE_INT64, opt, None),
        ("str_value", 5, T.TYPE_STRING, opt, None), ("bytes_value", 6, T.TYPE_BYTES, opt, None),
        ("ref_value", 7, T.TYPE_UINT64, opt, None))
    msg("XEvent", ("metadata_id", 1, T.TYPE_INT64, opt, None), ("offset_ps", 2, T.TYPE_INT64, opt, None),
        ("duration_ps", 3, T.TYPE_INT64, opt, None), ("stats", 4, T.TYPE_MESSAGE, rep, "XStat"))
    msg("XLine", ("id", 1, T.TYPE_INT64, opt, None), ("name", 2, T.TYPE_STRING, opt, None),
        ("timestamp_ns", 3, T.TYPE_INT64, opt, None), ("events", 4, T.TYPE_MESSAGE, rep, "XEvent"))
    msg("XEventMetadata", ("id", 1, T.TYPE_INT64, opt, None), ("name", 2, T.TYPE_STRING, opt, None),
        ("display_name", 4, T.TYPE_STRING, opt, None), ("stats", 5, T.TYPE_MESSAGE, rep, "XStat"))
    msg("XStatMetadata", ("id", 1, T.TYPE_INT64, opt, None), ("name", 2, T.TYPE_STRING, opt, None))
    # map<int64, X> is a repeated entry message with key = 1, value = 2
    msg("EventMetadataEntry", ("key", 1, T.TYPE_INT64, opt, None), ("value", 2, T.TYPE_MESSAGE, opt, "XEventMetadata"))
    msg("StatMetadataEntry", ("key", 1, T.TYPE_INT64, opt, None), ("value", 2, T.TYPE_MESSAGE, opt, "XStatMetadata"))
    msg("XPlane", ("id", 1, T.TYPE_INT64, opt, None), ("name", 2, T.TYPE_STRING, opt, None),
        ("lines", 3, T.TYPE_MESSAGE, rep, "XLine"), ("event_metadata", 4, T.TYPE_MESSAGE, rep, "EventMetadataEntry"),
        ("stat_metadata", 5, T.TYPE_MESSAGE, rep, "StatMetadataEntry"), ("stats", 6, T.TYPE_MESSAGE, rep, "XStat"))
    msg("XSpace", ("planes", 1, T.TYPE_MESSAGE, rep, "XPlane"))
    # xla.HloProto, just the path to each instruction's metadata.op_name
    msg("OpMetadata", ("op_type", 1, T.TYPE_STRING, opt, None), ("op_name", 2, T.TYPE_STRING, opt, None))
    msg("HloInstruction", ("name", 1, T.TYPE_STRING, opt, None), ("opcode", 2, T.TYPE_STRING, opt, None),
        ("metadata", 7, T.TYPE_MESSAGE, opt, "OpMetadata"))
    msg("HloComputation", ("name", 1, T.TYPE_STRING, opt, None), ("instructions", 2, T.TYPE_MESSAGE, rep, "HloInstruction"))
    msg("HloModule", ("name", 1, T.TYPE_STRING, opt, None), ("computations", 3, T.TYPE_MESSAGE, rep, "HloComputation"))
    msg("HloProto", ("hlo_module", 1, T.TYPE_MESSAGE, opt, "HloModule"))  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    get = lambda n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tbx.{n}"))  # noqa: E731
    return get("XSpace"), get("HloProto")


def find_xplane(logdir) -> Path:
    files = sorted(glob.glob(os.path.join(str(logdir), "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no .xplane.pb under {logdir}")
    return Path(files[-1])


def read_trace(path) -> dict:
    """Events of an .xplane.pb: ``{"events": [(plane, line, name, duration_ps, stats)], "op_names":
    {(module, hlo_op): op_name}}`` (op names from the HloProtos stored in the xplane). ``stats``
    carries ``self_ps`` too: the duration less that of the events nested in it on its line."""
    XSpace, HloProto = _messages()
    space = XSpace.FromString(Path(path).read_bytes())
    events, op_names = [], {}
    for plane in space.planes:
        emeta = {e.key: e.value for e in plane.event_metadata}
        smeta = {s.key: s.value.name for s in plane.stat_metadata}
        for m in emeta.values():  # the metadata plane keeps each program's HloProto as a stat
            for st in m.stats:
                if smeta.get(st.metadata_id) in ("Hlo Proto", "hlo_proto") and st.bytes_value:
                    module = HloProto.FromString(st.bytes_value).hlo_module
                    for comp in module.computations:
                        for ins in comp.instructions:
                            if ins.metadata.op_name:
                                op_names[(module.name, ins.name)] = ins.metadata.op_name
        for line in plane.lines:
            # An event's self time is its duration less the events nested in it on the same line (a
            # while loop holds its body's ops: counting both would count the loop twice).
            open_events: list = []  # [end_ps, stats] of the events enclosing the current one
            for ev in sorted(line.events, key=lambda e: (e.offset_ps, -e.duration_ps)):
                stats = {}
                for st in ev.stats:
                    key = smeta.get(st.metadata_id, str(st.metadata_id))
                    stats[key] = st.str_value or (smeta.get(st.ref_value) if st.ref_value else None) or st.int64_value or st.uint64_value
                while open_events and open_events[-1][0] <= ev.offset_ps:
                    open_events.pop()
                if open_events and ev.offset_ps + ev.duration_ps <= open_events[-1][0]:  # nested, not overlapping
                    open_events[-1][1]["self_ps"] -= ev.duration_ps
                stats["self_ps"] = ev.duration_ps
                open_events.append([ev.offset_ps + ev.duration_ps, stats])
                events.append((plane.name, line.name, emeta[ev.metadata_id].name if ev.metadata_id in emeta else "", ev.duration_ps, stats))
    return {"events": events, "op_names": op_names}


def innermost_layer(op_name: str, scopes=None):
    """``jit(f)/layers.3/layers.3.self_attn/dot_general`` -> ``layers.3.self_attn``: the innermost
    path component that is one of ``scopes`` (the model's block names), or, without them, that
    looks like a layer scope."""
    if scopes is not None:
        found = [part for part in op_name.split("/") if part in scopes]
        return found[-1] if found else None
    found = [m.group(0) for m in LAYER_PATTERN.finditer(op_name)]
    return found[-1].removeprefix("model.").removeprefix("gpt_neox.") if found else None


def natural_key(name: str) -> list:
    """``layers.2`` before ``layers.10``: digits compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def viewer_hint(logdir) -> str:
    """How to look at the trace: TensorBoard's profile plugin is the optional ``profile`` extra."""
    try:
        import tensorboard  # noqa: F401

        try:
            import tensorboard_plugin_profile  # noqa: F401
        except ImportError:
            import xprof  # noqa: F401
        return f"view it: tensorboard --logdir {logdir}"
    except ImportError:
        pass
    return (f"view it: pip install 'torchax-bridge[profile]' (TensorBoard + its profile plugin), "
            f"then tensorboard --logdir {logdir}")  # fmt: skip


def summarize(path, top: int = 10, scopes=None) -> dict:
    """Top ops by self time, time per model layer, collectives vs compute, and the steps seen."""
    trace = read_trace(path)
    by_op, by_layer = Counter(), Counter()
    collective_ps = compute_ps = 0
    steps = set()
    for plane, line, name, dur, stats in trace["events"]:
        if plane.startswith("/host") and name == "step" and "step_num" in stats:  # StepTraceAnnotation
            steps.add(f"step {stats['step_num']}")
        hlo_op = stats.get("hlo_op")
        if not hlo_op:
            continue
        dur = stats["self_ps"]  # a loop's body ops count once, under their own names
        by_op[hlo_op] += dur
        if any(hlo_op.startswith(c) for c in hlo.COLLECTIVES):
            collective_ps += dur
        else:
            compute_ps += dur
        layer = innermost_layer(trace["op_names"].get((stats.get("hlo_module"), hlo_op), ""), scopes)
        if layer:
            by_layer[layer] += dur
    return {
        "steps": sorted(steps, key=natural_key),
        "top_ops_ms": [(n, d / 1e9) for n, d in by_op.most_common(top)],
        "layers_ms": {k: by_layer[k] / 1e9 for k in sorted(by_layer, key=natural_key)},
        "collective_ms": collective_ps / 1e9,
        "compute_ms": compute_ps / 1e9,
        "named_layers": sorted({innermost_layer(n, scopes) for n in trace["op_names"].values()} - {None}, key=natural_key),
    }


def trace_steps(run, steps: int, logdir, scopes) -> dict:
    """Runs ``run()`` once to warm up, then ``steps`` times inside ``jax.profiler.trace``, each in a
    StepTraceAnnotation; returns the trace's summary (with ``logdir`` and ``xplane``)."""
    jax.block_until_ready(run())  # warm-up, outside the trace
    Path(logdir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with jax.profiler.trace(str(logdir)):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("step", step_num=i):
                jax.block_until_ready(run())
    traced_s = time.perf_counter() - t0
    path = find_xplane(logdir)
    summary = summarize(path, scopes=scopes)
    summary.update(logdir=str(logdir), xplane=str(path), traced_seconds=traced_s)
    return summary


def profile(lifted, mode: str = "forward", steps: int = 3, logdir="/tmp/torchax-bridge-trace", batch=1, seq=32) -> dict:
    """A causal LM's forward or decode step: compiled and warmed up outside the trace, then
    ``steps`` steps traced. Returns the summary."""
    from bridge import programs

    with named_modules_scope(lifted.model):  # a fresh trace, so the scopes land in the program
        fn, args = programs.step_program(lifted, mode, batch, seq)
        compiled = fn.lower(*args).compile()
    state = {"args": args}

    def run():
        out = compiled(*state["args"])
        state["args"] = programs.next_args(mode, state["args"], out)
        return out

    summary = trace_steps(run, steps, logdir, {name for name, _ in named_blocks(lifted.model)})
    if lifted.scan_layers:
        summary["layers_ms"] = per_layer_of_scan(summary["layers_ms"], lifted.model)
    return summary


def per_layer_of_scan(layers_ms: dict, model) -> dict:
    """A scanned stack runs its first layer's modules as the loop body, so the trace files every
    layer's time under ``layers.0``: shown as ``layers.*``, the step's time per layer (the body's
    total over the layer count)."""
    from bridge import scan

    layers = model.get_submodule(scan.stack_path(model))
    # the scope name the profile gives layer 0 (a causal LM's named_blocks are short: "layers.0")
    first, n = next(name for name, m in named_blocks(model) if m is layers[0]), len(layers)
    stem = first.rpartition(".")[0]
    out = {}
    for name, ms in layers_ms.items():
        if name == first or name.startswith(first + "."):
            out[f"{stem}.*{name[len(first):]} (per layer, {n} scanned)"] = ms / n
        else:
            out[name] = ms
    return out


def profile_call(lifted, args=(), kwargs=None, steps: int = 3, logdir="/tmp/torchax-bridge-trace") -> dict:
    """Any lifted module's jitted forward on ``args``/``kwargs``, traced like ``profile``, with time
    per named block (``named_blocks``)."""
    import dataclasses

    fresh = dataclasses.replace(lifted)  # its own jit cache: traced again under the scopes
    with named_modules_scope(lifted.model):
        # A program name of its own: the trace keys op names by program name.
        call, arrays = fresh.jitted(tuple(args), dict(kwargs or {}), name=f"profiled_{type(lifted.model).__name__}")
        compiled = call.lower(lifted.weights, arrays).compile()
    run = lambda: compiled(lifted.weights, arrays)  # noqa: E731
    summary = trace_steps(run, steps, logdir, {name for name, _ in named_blocks(lifted.model)})
    if lifted.plan is not None and lifted.plan.scan_layers and not getattr(lifted.fn, "why", None):
        summary["layers_ms"] = per_layer_of_scan(summary["layers_ms"], lifted.model)
    return summary


def format_summary(s: dict) -> str:
    lines = [f"trace: {s['xplane']}", viewer_hint(s["logdir"]), f"steps traced: {', '.join(s['steps'])}"]
    total = s["collective_ms"] + s["compute_ms"]
    if total:
        lines.append(f"op time: compute {s['compute_ms']:.2f} ms, collectives {s['collective_ms']:.2f} ms "
                     f"({s['collective_ms'] / total:.0%})")  # fmt: skip
    lines.append("top ops by self time:")
    lines += [f"  {ms:9.3f} ms  {name}" for name, ms in s["top_ops_ms"]]
    if s["layers_ms"]:
        lines.append("time per named layer:")
        lines += [f"  {ms:9.3f} ms  {name}" for name, ms in s["layers_ms"].items()]
    return "\n".join(lines)
