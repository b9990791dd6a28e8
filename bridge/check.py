"""Parity checking: the same module in eager torch, lifted on one device, and lifted under a scheme,
compared submodule by submodule, so a disagreement is named where it starts instead of showing up as
wrong output at the end.

    report = check_module(model, (images,), mesh=mesh8, scheme=my_table)
    print(format_check(report))          # per-module max relative error; the first divergence named
    assert report.ok

Two things are found before anything runs on a device:
  * aten ops of the forward that torchax cannot lower (``missing_lowerings``): the forward is traced
    once abstractly, and each op without a lowering is recorded and stood in for by zeros of its
    meta-kernel output shape, so the trace goes on and every missing op is listed at once;
  * then each submodule's outputs are captured by forward hooks: eagerly on the torch side, and as
    extra outputs of the jitted program on the JAX side (the hooks run while torchax traces).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.utils import _pytree as torch_pytree

import sharding
from bridge import scan
from bridge.lift import LiftedModule, as_scheme, extract_fn, is_causal_lm, jax_dtype, lift
from bridge.extract import evaluating, torchax_with_lowerings

# Max relative error (max |lifted - eager| / max |eager|) above which a module diverges.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def _torch_dtype(dtype) -> torch.dtype:
    return getattr(torch, np.dtype(dtype).name)


# ---------------------------------------------------------------------------------------------------
# Missing lowerings
# ---------------------------------------------------------------------------------------------------
def missing_lowerings(model: torch.nn.Module, args: Sequence = (), kwargs: Optional[dict] = None) -> dict:
    """Traces ``model``'s forward through torchax abstractly (``jax.eval_shape``: no weight is
    converted, nothing runs) and returns ``{"missing": [aten op names], "stopped": error or None}``.

    An aten op with no lowering is recorded and replaced by zeros shaped by its meta kernel, so one
    pass finds every missing op; ``stopped`` is set when tracing could not go on (an op whose output
    shape depends on data, a Python branch on a traced value)."""
    tx = torchax_with_lowerings()
    from torchax.ops import ops_registry
    from torchax.tensor import OperatorNotFound

    env = tx.default_env()
    names, fn = extract_fn(model)
    weights = {k: jax.ShapeDtypeStruct(shape, jax_dtype(dtype)) for k, (shape, dtype) in names.items()}
    missing: dict[str, None] = {}
    lookup = env._get_op_or_decomp

    def stand_in(func):
        def run(*a, **k):  # a jax function: tensors arrive as jax arrays (tracers)
            from torch.utils._python_dispatch import _disable_current_modes

            with _disable_current_modes(), torch._C.DisableTorchFunction():  # plain torch, on meta
                meta = jax.tree.map(
                    lambda x: torch.empty(x.shape, dtype=_torch_dtype(x.dtype), device="meta")
                    if isinstance(x, jax.Array) else x, (a, k))  # fmt: skip
                out = func(*meta[0], **meta[1])
            return torch_pytree.tree_map_only(torch.Tensor, lambda t: jnp.zeros(tuple(t.shape), jax_dtype(t.dtype)), out)

        return ops_registry.Operator(func, run, is_jax_function=True, is_user_defined=True, needs_env=False, is_view_op=False)

    # Where tracing stops: the innermost module running (forward hooks keep the stack) and the op
    # whose lowering raised, if one did.
    names_of = {id(m): n for n, m in model.named_modules() if n}
    running: list[str] = []
    failed_op: list[str] = []

    def enter(module, args):
        if id(module) in names_of:
            running.append(names_of[id(module)])

    def leave(module, args, out):
        if id(module) in names_of and running:
            running.pop()

    def op_name(func) -> str:  # aten::index.Tensor, or a torch function: torch.Tensor.__getitem__
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return func.name()
        return f"torch.{getattr(func, '__qualname__', getattr(func, '__name__', str(func)))}".replace("TensorBase", "Tensor").replace("_Tensor", "Tensor")

    def watched(op, func):
        def run(*a, **k):
            try:
                return op.func(*a, **k)
            except Exception:
                if not failed_op:
                    failed_op.append(op_name(func))
                raise

        return dataclasses.replace(op, func=run)

    def recording_lookup(func):
        try:
            return watched(lookup(func), func)
        except OperatorNotFound:
            if not isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                raise  # a torch function: torchax falls back to its aten ops, which are looked up in turn
            missing[func.name()] = None
            return stand_in(func)

    def as_array(x):
        if isinstance(x, torch.Tensor):
            return jax.ShapeDtypeStruct(tuple(x.shape), jax_dtype(x.dtype))
        return x

    array_args = torch_pytree.tree_map(as_array, (tuple(args), dict(kwargs or {})))
    leaves, tree = jax.tree.flatten(array_args)
    is_array = [isinstance(x, jax.ShapeDtypeStruct) for x in leaves]

    def traced(w, arrays):
        it = iter(arrays)
        a, k = jax.tree.unflatten(tree, [next(it) if arr else x for x, arr in zip(leaves, is_array)])
        return fn(w, a, k)

    env._get_op_or_decomp = recording_lookup  # an instance attribute: shadows the method until deleted
    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]  # fmt: skip
    stopped = None
    try:
        jax.eval_shape(traced, weights, [x for x, arr in zip(leaves, is_array) if arr])
    except Exception as e:  # noqa: BLE001 - reported, not hidden: the check cannot trace past it
        where = f"in {running[-1]} ({type(model.get_submodule(running[-1])).__name__})" if running else "in forward"
        if failed_op:
            where += f", in the lowering of {failed_op[0]}"
        stopped = f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        del env._get_op_or_decomp
        for h in hooks:
            h.remove()
    return {"missing": list(missing), "stopped": stopped}


# ---------------------------------------------------------------------------------------------------
# Capturing submodule outputs
# ---------------------------------------------------------------------------------------------------
class Taps:
    """Forward hooks on every named submodule that record its output tensors, in the order the
    modules finish (a module called twice is recorded as ``name``, ``name#2``). In a scanned
    decoder stack the first layer's hooks fire once, inside the scan body; their records come out
    of the scan stacked per layer (``scan.per_iteration_outputs``) and are spread back as every
    layer's own (``model.layers.3.mlp``), so both layouts give the eager run's rows."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = [(n, m) for n, m in model.named_modules() if n]
        self.order: list[str] = []
        self._records: list[tuple[str, list]] = []  # (module label, its output tensors converted)
        self._seen: dict[str, int] = {}
        self._body_names: list[str] = []

    def run(self, call, convert):
        """``call()`` with the hooks on; returns (its result, [outputs per module, as ``convert`` makes
        each tensor]) and sets ``self.order`` to the modules' names."""
        self._records, self._seen = [], {}

        def hook(name):
            def record(module, args, out):
                self._seen[name] = self._seen.get(name, 0) + 1
                label = name if self._seen[name] == 1 else f"{name}#{self._seen[name]}"
                self._records.append((label, [convert(t) for t in torch_pytree.tree_leaves(out)
                                              if isinstance(t, torch.Tensor)]))  # fmt: skip

            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in self.modules]
        try:
            with scan.per_iteration_outputs(self):
                result = call()
        finally:
            for h in handles:
                h.remove()
        self.order = [label for label, _ in self._records]
        return result, [values for _, values in self._records]

    # The scan body's side of ``scan.per_iteration_outputs``.
    def mark(self):
        return len(self._records), dict(self._seen)

    def take(self, mark) -> list:
        at, seen = mark
        body, self._records[at:] = self._records[at:], []
        self._seen = seen  # a body traced twice must not count its modules as called twice
        self._body_names = [label for label, _ in body]
        return [values for _, values in body]

    def spread(self, stacked: list, num_layers: int) -> None:
        for i in range(num_layers):
            for name, values in zip(self._body_names, stacked):
                self._records.append((scan.layer_name(self.model, name, i), [v[i] for v in values]))

    def eager(self, model, args, kwargs) -> tuple[Any, dict[str, list[np.ndarray]]]:
        with torch.no_grad(), evaluating(model):  # the lifted program is eval mode's (inference)
            # Copies: a view would change under the next in-place op (ResNet's ReLU(inplace=True)
            # overwrote each captured BatchNorm output, and check reported a divergence of 1.1).
            out, captured = self.run(lambda: model(*args, **kwargs), _eager_copy)
        return out, dict(zip(self.order, captured))

    def lifted(self, lifted: LiftedModule, args, kwargs) -> tuple[Any, dict[str, list[np.ndarray]]]:
        env = torchax_with_lowerings().default_env()
        inner = lifted.fn

        def fn(weights, a, k=None):
            return self.run(lambda: inner(weights, a, k), lambda t: env.t2j_iso(t))

        call, arrays = dataclasses.replace(lifted, fn=fn).jitted(tuple(args), dict(kwargs), name="checked_forward")
        out, captured = call(lifted.weights, arrays)
        captured = jax.tree.map(lambda x: np.asarray(sharding.to_host(x), np.float32)
                                if jnp.issubdtype(x.dtype, jnp.floating) else np.asarray(sharding.to_host(x)),
                                captured)  # fmt: skip
        return out, dict(zip(self.order, captured))


# ---------------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------------
def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (exact match: 0; a zero reference: the absolute error)."""
    if isinstance(want, np.ma.MaskedArray):  # compare where eager torch has values (_eager_copy)
        got = np.asarray(got)[tuple(slice(0, n) for n in want.shape)]
        present = ~np.ma.getmaskarray(want)
        got, want = got[present], np.asarray(want.data)[present]
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.size == 0:
        return 0.0
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        return 0.0 if np.array_equal(got, want, equal_nan=True) else math.inf
    scale = float(np.abs(want).max())
    return float(np.abs(got - want).max()) / (scale if scale > 0 else 1.0)


def module_error(got: list, want: list, vocab: Optional[int] = None) -> Optional[float]:
    """The worst relative error over a module's output tensors; None when the layouts differ (a
    kv head repeated for a wide head axis) and cannot be compared elementwise. Logits of a vocab
    padded to divide the mesh are compared on the true vocab."""
    if len(got) != len(want):
        return None
    worst = 0.0
    for g, w in zip(got, want):
        if isinstance(w, np.ma.MaskedArray) and g.ndim == w.ndim and all(a >= b for a, b in zip(g.shape, w.shape)):
            worst = max(worst, relative_error(g, w))
            continue
        if g.shape != w.shape and vocab is not None and g.shape[:-1] == w.shape[:-1] and w.shape[-1] == vocab:
            g = g[..., :vocab]
        if g.shape != w.shape:
            return None
        worst = max(worst, relative_error(g, w))
    return worst


@dataclasses.dataclass
class CheckRow:
    module: str
    shape: list  # the first output tensor's shape (eager)
    errors: dict  # run label -> max relative error, or None (not comparable)


@dataclasses.dataclass
class CheckReport:
    runs: list[str]  # labels of the lifted runs, e.g. ["1 device", "tp on 8"]
    tolerance: float
    missing: list[str]
    stopped: Optional[str]
    rows: list[CheckRow]
    output_errors: dict  # run label -> max relative error of the forward's own outputs

    @property
    def first_divergence(self) -> Optional[tuple[str, str, float]]:
        """(module, run, error) of the first module, in execution order, beyond the tolerance."""
        for row in self.rows:
            for run in self.runs:
                e = row.errors.get(run)
                if e is not None and e > self.tolerance:
                    return row.module, run, e
        return None

    @property
    def ok(self) -> bool:
        return (not self.missing and self.stopped is None and self.first_divergence is None
                and all(e is not None and e <= self.tolerance for e in self.output_errors.values()))  # fmt: skip

    def to_json(self) -> dict:
        first = self.first_divergence
        return {
            "ok": self.ok,
            "tolerance": self.tolerance,
            "missing_lowerings": self.missing,
            "trace_stopped": self.stopped,
            "first_divergence": None if first is None else {"module": first[0], "run": first[1], "error": first[2]},
            "output_errors": self.output_errors,
            "modules": [dataclasses.asdict(r) for r in self.rows],
        }


def _eager_copy(t: torch.Tensor) -> np.ndarray:
    """A copy of an eager output. A nested tensor (eager ``nn.TransformerEncoder``'s fused path
    with a padding mask holds only the unpadded rows) becomes a masked array over the padded
    layout: its padding is absent in eager torch, so it is not compared."""
    if t.is_nested:
        absent = float("nan")
        return np.ma.masked_invalid(t.detach().float().to_padded_tensor(absent).cpu().numpy())
    return t.detach().float().cpu().numpy().copy() if t.is_floating_point() else t.detach().cpu().numpy().copy()


def _eager_leaves(out) -> list[np.ndarray]:
    return [t.detach().float().cpu().numpy().copy() if t.is_floating_point() else t.cpu().numpy().copy()
            for t in torch_pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]  # fmt: skip


def _lifted_leaves(out) -> list[np.ndarray]:
    return [np.asarray(sharding.to_host(x)) for x in jax.tree.leaves(out)]


def one_device_mesh():
    return sharding.make_mesh({"model": 1}, jax.devices()[:1])


def check_module(
    model: torch.nn.Module,
    args: Sequence = (),
    kwargs: Optional[dict] = None,
    *,
    mesh=None,
    scheme="replicated",
    tolerance: float = TOLERANCE["float32"],
    fallback: str = "error",
    scan_layers: bool | None = None,
    progress=None,
    one_device: Optional[LiftedModule] = None,
) -> CheckReport:
    """``model`` run eagerly, lifted on one device (``one_device``: already lifted there, replicated;
    consumed: its weights are released after its run), and (when ``mesh`` is given) lifted on ``mesh``
    under ``scheme`` (a scheme, name, rules file or list of ``(regex, spec)`` rows), with every
    submodule's outputs compared against eager torch (``scan_layers``: both lifted runs scan the
    decoder stack, and every layer is still compared). Runs one after the other: a causal LM lifted
    under a tensor-parallel scheme may split its fused projections in place."""
    say = progress or (lambda line: None)
    kwargs = dict(kwargs or {})
    args = tuple(args)
    survey = missing_lowerings(model, args, kwargs)
    scan_layers = scan.scans(model, scan_layers)
    scanned = ", scanned" if scan_layers else ""
    runs = [f"1 device{scanned}"]
    if mesh is not None:
        scheme = as_scheme(scheme)
        runs.append(f"{scheme.name} on {math.prod(mesh.shape.values())}{scanned}")
    if survey["missing"] or survey["stopped"]:
        return CheckReport(runs, tolerance, survey["missing"], survey["stopped"], [], {})
    taps = Taps(model)
    say("running eager torch")
    eager_out, eager = taps.eager(model, args, kwargs)
    eager_out = _eager_leaves(eager_out)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) if is_causal_lm(model) else None
    rows = {name: CheckRow(name, list(v[0].shape) if v else [], {}) for name, v in eager.items()}
    output_errors = {}
    for label, (m, s) in zip(runs, [(one_device_mesh(), "replicated"), (mesh, scheme)]):
        say(f"running lifted: {label}")
        lifted = one_device if one_device is not None else lift(model, m, s, fallback=fallback, scan_layers=scan_layers)
        one_device = None
        out, captured = taps.lifted(lifted, args, kwargs)
        output_errors[label] = module_error(_lifted_leaves(out), eager_out, vocab)
        for name, want in eager.items():
            got = captured.get(name)
            rows[name].errors[label] = None if got is None else module_error(got, want, vocab)
        lifted.weights = {}  # released now, also when the caller still holds ``one_device``
        del lifted, out, captured
    return CheckReport(runs, tolerance, [], None, list(rows.values()), output_errors)


def format_check(report: CheckReport, max_rows: Optional[int] = None) -> str:
    lines = []
    if report.missing:
        lines.append(f"aten ops torchax cannot lower ({len(report.missing)}): {', '.join(report.missing)}")
        lines.append("  register a lowering for each (torchax env.override_op_definition, or a jax function in "
                     "bridge/lowerings.py) or avoid the op in forward")  # fmt: skip
    else:
        lines.append("aten ops torchax cannot lower: none")
    if report.stopped:
        lines.append(f"tracing stopped: {report.stopped}")
    if not report.rows:
        lines.append("FAIL: the forward cannot be lifted as written")
        return "\n".join(lines)
    fmt = lambda e: "n/a" if e is None else f"{e:.2e}"  # noqa: E731
    width = max(len(r.module) for r in report.rows)
    col = max(14, *(len(r) + 2 for r in report.runs))
    lines.append(f"max relative error per module vs eager torch (tolerance {report.tolerance:g}; "
                 f"in the order modules finish):")  # fmt: skip
    lines.append(f"  {'module':<{width}}  {'shape':<18}" + "".join(f"{r:>{col}}" for r in report.runs))
    rows = report.rows if max_rows is None else report.rows[:max_rows]
    for row in rows:
        mark = " <-" if any(e is not None and e > report.tolerance for e in row.errors.values()) else ""
        lines.append(f"  {row.module:<{width}}  {str(row.shape):<18}"
                     + "".join(f"{fmt(row.errors.get(r)):>{col}}" for r in report.runs) + mark)  # fmt: skip
    if len(rows) < len(report.rows):
        lines.append(f"  ... {len(report.rows) - len(rows)} more modules")
    skipped = sum(1 for r in report.rows for e in r.errors.values() if e is None)
    if skipped:
        lines.append("  n/a: the lifted layout differs (kv heads repeated for a wide head axis), not compared")
    lines.append("forward outputs: " + ", ".join(f"{r} {fmt(e)}" for r, e in report.output_errors.items()))
    first = report.first_divergence
    if first:
        lines.append(f"FAIL: first divergence at {first[0]} ({first[1]}: {first[2]:.2e} > {report.tolerance:g})")
    elif not report.ok:
        lines.append("FAIL: the forward's outputs diverge")
    else:
        lines.append(f"OK: every module within {report.tolerance:g} of eager torch")
    return "\n".join(lines)


def check_checkpoint(
    checkpoint: str,
    devices: Sequence,
    scheme="tp",
    *,
    mesh_overrides: Optional[dict] = None,
    input_ids: Optional[Sequence[int]] = None,
    dtype: str = "float32",
    quantize: str = "none",
    fallback: str = "error",
    implementation: str = "auto",
    tolerance: Optional[float] = None,
    scan_layers: bool | None = None,
    progress=None,
) -> CheckReport:
    """``check_module`` for a checkpoint (anything ``open_model`` takes) on token ids (default: 16
    fixed pseudo-random ids), under ``scheme`` on ``devices``."""
    from bridge.generate import check_token_ids
    from bridge.models import open_model

    scheme = sharding.get_scheme(scheme)
    mesh = sharding.mesh_for(scheme, len(devices), mesh_overrides or {}, list(devices))
    one_device = open_model(checkpoint, devices=list(devices)[:1], scheme="replicated", dtype=dtype, quantize=quantize,
                            with_tokenizer=False, implementation=implementation, scan_layers=scan_layers)  # fmt: skip
    model = one_device.model
    if any(t.is_meta for t in model.state_dict().values()):  # opened slice by slice (a published layout):
        from bridge import checkpoints  # the eager reference needs the weights in host memory

        model = checkpoints.load(checkpoint, dtype, with_tokenizer=False, quantize=quantize,
                                 implementation=implementation).model  # fmt: skip
    vocab = model.vocab_size
    if input_ids is None:
        input_ids = np.random.default_rng(0).integers(0, vocab, 16).tolist()
    check_token_ids([input_ids], vocab)
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    tol = tolerance if tolerance is not None else TOLERANCE[dtype]
    return check_module(model, (ids,), mesh=mesh, scheme=scheme, tolerance=tol, fallback=fallback,
                        scan_layers=scan_layers, progress=progress, one_device=one_device)  # fmt: skip
