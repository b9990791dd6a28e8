"""Sharding schemes as data: ordered tables of (parameter-name regex -> PartitionSpec), first match wins.

This is the file to open when you want to try another way of placing a model on a mesh. A scheme is a
``Scheme``: a rule table plus the mesh axes it uses, which axes carry the batch, and which axis (if any)
splits attention heads (used for the KV cache). Adding a scheme means adding a table to ``SCHEMES`` or
writing one in your own file (``--scheme my_rules.py:NAME`` or a JSON/YAML list of
``[regex, [axis-or-null, ...]]`` rows).

Spec entries are mesh-axis names, ``None`` (not sharded on that dim) or a tuple of axis names (sharded
over their product). A spec shorter than the tensor's rank leaves the trailing dims unsharded.
``ShardLargest(axis)`` is the one computed spec: the tensor's largest dimension that the axis divides
(FSDP). Torch ``Linear`` weights are ``[out, in]``: column-parallel shards dim 0, row-parallel dim 1.

This module does not import torch: names, shapes and dtypes are all it needs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bridge.errors import ShardingError  # noqa: F401  (re-exported: scheme authors catch it here)




@dataclasses.dataclass(frozen=True)
class ShardLargest:
    """Shard the largest dimension that ``axis`` divides (ties: the first); replicate if none does."""

    axis: str
    min_elements: int = 4096  # smaller tensors (biases, norm scales) are not worth a gather


Spec = tuple  # of None | str | tuple[str, ...]
Rule = tuple  # (regex, Spec | ShardLargest)

# ---------------------------------------------------------------------------------------------------
# Building blocks shared by the tables. Patterns are searched in the state-dict name.
# ---------------------------------------------------------------------------------------------------
NORMS = r"(norm|layernorm|ln_f|layer_norm)[^.]*\.(weight|bias)$"
ATTN_COLUMN = r"\.(q_proj|k_proj|v_proj|query_key_value)\.(weight|bias|scale)$"
ATTN_ROW = r"\.(o_proj|attention\.dense|self_attention\.dense)\.weight$"
MLP_COLUMN = r"\.(gate_proj|up_proj|dense_h_to_4h)\.(weight|bias|scale)$"
MLP_ROW = r"\.(down_proj|dense_4h_to_h)\.weight$"
ROW_BIAS = r"\.(o_proj|attention\.dense|self_attention\.dense|down_proj|dense_4h_to_h)\.bias$"
# GPT-2's Conv1D weights are stored [in, out]: column-parallel is dim 1, row-parallel dim 0. Its
# config carries no tp plan, so these rows are written by hand.
CONV1D_COLUMN = r"\.(c_attn|c_fc)\.weight$"
CONV1D_COLUMN_BIAS = r"\.(c_attn|c_fc)\.bias$"
CONV1D_ROW = r"\.c_proj\.weight$"
CONV1D_ROW_BIAS = r"\.c_proj\.bias$"
EMBED = r"(embed_tokens|embed_in|wte|word_embeddings|(^|\.)embeddings)\.(weight|scale)$"  # Mamba, NemotronH: `embeddings`
# Learned position tables (GPT-2 ``wpe``): every device looks up every position; kept whole.
POSITIONS = r"(wpe|embed_positions|position_embeddings)\.weight$"
LM_HEAD = r"lm_head\.(weight|scale)$"
ROUTER = r"\.mlp\.gate\.weight$"
EXPERT_IN = r"\.experts\.gate_up_proj(_scale)?$"  # [E, 2F, H]
EXPERT_OUT = r"\.experts\.down_proj$"  # [E, H, F]
EXPERT_OUT_SCALE = r"\.experts\.down_proj_scale$"  # [E, H]
CATCH_ALL = r".*"
VOCAB_TENSOR = re.compile(rf"{EMBED}|lm_head\.(weight|scale|bias)$")  # dim 0: the vocabulary (padded when split)


def megatron(axis: str) -> list[Rule]:
    """Megatron tensor parallelism over ``axis``: one all-reduce after each row-parallel matmul.

    Embedding and LM head are vocab-parallel (dim 0): the lookup becomes a masked local gather plus
    one all-reduce, and the head's logits come out vocab-sharded with no reduction over the hidden
    dim. Measured against hidden-sharding them (P(None, axis), the tutorial's choice) on SmolLM2 over
    3 devices: forward 61 vs 122 all-reduces (+60 all-gathers), 9.0 vs 30.3 MB of collectives,
    184 vs 205 MB peak per device; decode step 66 vs 79 ms (`torchax-bridge compare`).
    """
    return [
        (NORMS, ()),
        (ATTN_COLUMN, (axis,)),
        (ATTN_ROW, (None, axis)),
        (MLP_COLUMN, (axis,)),
        (MLP_ROW, (None, axis)),
        (ROW_BIAS, ()),
        (CONV1D_COLUMN, (None, axis)),
        (CONV1D_COLUMN_BIAS, (axis,)),
        (CONV1D_ROW, (axis, None)),
        (CONV1D_ROW_BIAS, ()),
        (POSITIONS, ()),
        (EMBED, (axis, None)),
        (LM_HEAD, (axis,)),
    ]


def experts(expert_axis: str | None, model_axis: str | None) -> list[Rule]:
    """MoE experts: expert dim on ``expert_axis``, each expert's FFN Megatron-split on ``model_axis``."""
    return [
        (ROUTER, ()),
        (EXPERT_IN, (expert_axis, model_axis)),
        (EXPERT_OUT, (expert_axis, None, model_axis)),
        (EXPERT_OUT_SCALE, (expert_axis,)),
    ]


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    rules: tuple[Rule, ...]
    # Mesh axes in order with their default size; -1 takes the devices left over (at most one).
    mesh: tuple[tuple[str, int], ...]
    batch_axes: tuple[str, ...] = ()  # input batch dim sharded over these
    head_axis: str | None = None  # attention heads (and the KV cache's kv-head dim) split over this
    description: str = ""
    # Pin each decoder layer's output [B, T, H] to the batch spec: without it, XLA may move
    # activations instead of gathering weights (for FSDP that defeats the point).
    constrain_activations: bool = False
    # Built-in tables write (axis, None) once for a weight and its 1-D scale/bias; a table from a
    # user's file is taken literally: a spec longer than the tensor's rank is an error there.
    trim_specs: bool = True
    # Put the model's own tensor-parallel plan (``parallel_plan()`` of the model contract, e.g.
    # translated from a transformers config's ``base_model_tp_plan``) on ``head_axis`` ahead of
    # this table, so an architecture we never wrote a row for shards by its authors' plan.
    use_model_plan: bool = False

    def with_model_plan(self, plan: Sequence[tuple[str, int | None]]) -> "Scheme":
        """This scheme with ``plan`` rows ((regex, dim to split or None), from the model) first."""
        if not plan or not self.use_model_plan or self.head_axis is None:
            return self
        rows = tuple((rx, () if dim is None else (None,) * dim + (self.head_axis,)) for rx, dim in plan)
        return dataclasses.replace(self, rules=rows + self.rules)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.mesh)

    def mesh_shape(self, num_devices: int, overrides: Mapping[str, int] | None = None) -> dict[str, int]:
        """Axis sizes for ``num_devices``: the scheme's defaults, ``overrides`` (``--mesh``) on top."""
        sizes = dict(self.mesh)
        for name, size in (overrides or {}).items():
            if size < 1:
                raise ShardingError(f"mesh axis {name}={size}: sizes are positive integers; pass e.g. --mesh {name}=2")
            if name not in sizes:
                raise ShardingError(
                    f"mesh axis {name!r} is not used by scheme {self.name!r} (its axes: "
                    f"{', '.join(self.axis_names)}); pass --mesh with those axis names"
                )
            sizes[name] = size
        free = [n for n, s in sizes.items() if s == -1]
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if len(free) > 1:
            raise ShardingError(f"scheme {self.name!r}: at most one mesh axis may be -1")
        if free:
            if num_devices % fixed:
                raise ShardingError(
                    f"scheme {self.name!r}: {num_devices} devices do not divide into axes "
                    f"{_fmt_mesh({n: s for n, s in sizes.items() if s != -1})} x {free[0]}=?; "
                    f"pass --mesh with sizes whose product is {num_devices}"
                )
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise ShardingError(
                f"mesh {_fmt_mesh(sizes)} needs {math.prod(sizes.values())} devices but "
                f"{num_devices} are in use; pass --devices {math.prod(sizes.values())} or another --mesh"
            )
        return sizes


def _fmt_mesh(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{n}={s}" for n, s in sizes.items())


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme(
            "replicated",
            rules=((CATCH_ALL, ()),),
            mesh=(("model", -1),),
            description="every weight on every device; the unsharded reference",
        ),
        Scheme(
            "tp",
            rules=(*megatron("model"), *experts(None, "model"), (CATCH_ALL, ())),
            mesh=(("model", -1),),
            head_axis="model",
            description="Megatron tensor parallelism: q/k/v/gate/up column-, o/down row-parallel",
            use_model_plan=True,
        ),
        Scheme(
            "fsdp",
            rules=((NORMS, ()), (CATCH_ALL, ShardLargest("fsdp"))),
            mesh=(("fsdp", -1),),
            batch_axes=("fsdp",),
            constrain_activations=True,
            description="each large weight split on its largest divisible dim, gathered per layer",
        ),
        Scheme(
            "dp",
            rules=((CATCH_ALL, ()),),
            mesh=(("data", -1),),
            batch_axes=("data",),
            description="weights replicated, batch split",
        ),
        Scheme(
            "dp_tp",
            rules=(*megatron("model"), *experts(None, "model"), (CATCH_ALL, ())),
            mesh=(("data", 2), ("model", -1)),
            batch_axes=("data",),
            head_axis="model",
            description="2D mesh: batch on data, Megatron on model",
            use_model_plan=True,
        ),
        Scheme(
            "ep",
            rules=(*experts("expert", None), *megatron("expert"), (CATCH_ALL, ())),
            mesh=(("expert", -1),),
            head_axis="expert",
            description="MoE experts split over the expert axis, attention tensor-parallel on it",
            use_model_plan=True,
        ),
        Scheme(
            "ep_tp",
            rules=(*experts("expert", "model"), *megatron("model"), (CATCH_ALL, ())),
            mesh=(("expert", 2), ("model", -1)),
            head_axis="model",
            description="2D mesh: experts on expert, each expert's FFN and attention on model",
            use_model_plan=True,
        ),
    ]
}


# ---------------------------------------------------------------------------------------------------
# Loading user schemes
# ---------------------------------------------------------------------------------------------------
def _spec_from_data(raw: Any) -> Spec | ShardLargest:
    if isinstance(raw, Mapping) and "largest" in raw:
        if not isinstance(raw["largest"], str):
            raise ShardingError(f"{{'largest': AXIS}} needs an axis name, got {raw!r}")
        return ShardLargest(raw["largest"])
    if not isinstance(raw, (list, tuple)):
        raise ShardingError(f"a spec must be a list of axis names or nulls, got {raw!r}")
    spec = tuple(tuple(e) if isinstance(e, list) else e for e in raw)
    for e in spec:
        names = e if isinstance(e, tuple) else (e,)
        if not all(isinstance(n, str) for n in names) and e is not None:
            raise ShardingError(f"a spec entry is an axis name, null or a list of axis names, got {e!r} in {raw!r}")
    return spec


def check_spec(spec, where: str) -> None:
    """A mesh axis may shard at most one dimension of a tensor."""
    axes = _spec_axes(spec)
    twice = sorted({a for a in axes if axes.count(a) > 1})
    if twice:
        raise ShardingError(f"{where}: mesh axis {twice[0]!r} appears twice in spec {list(spec)}; "
                            f"an axis can shard only one dimension")  # fmt: skip


def scheme_from_rows(name: str, rows: Iterable[Any], mesh=None, **kw) -> Scheme:
    """A scheme from ``[regex, spec]`` rows (as in JSON/YAML); mesh axes inferred from the specs."""
    rules = []
    for row in rows:
        if not (isinstance(row, (list, tuple)) and len(row) == 2 and isinstance(row[0], str)):
            raise ShardingError(f"scheme {name!r}: each rule is [regex, spec], got {row!r}")
        try:
            re.compile(row[0])
        except re.error as e:
            raise ShardingError(f"scheme {name!r}: regex {row[0]!r} does not compile ({e})") from None
        spec = _spec_from_data(row[1])
        check_spec(spec, f"scheme {name!r}, rule {row[0]!r}")
        rules.append((row[0], spec))
    if mesh is None:
        axes: list[str] = []
        for _, spec in rules:
            for a in _spec_axes(spec):
                if a not in axes:
                    axes.append(a)
        mesh = tuple((a, -1 if i == len(axes) - 1 else 1) for i, a in enumerate(axes)) or (("model", -1),)
    return Scheme(name, tuple(rules), tuple(mesh), **{"trim_specs": False, **kw})


def _scheme_from_data(name: str, data: Any, path: str) -> Scheme:
    """A scheme file's content: a list of ``[regex, spec]`` rows, or ``{"rules": [...], "mesh":
    {axis: size}, "batch_axes": [...], "head_axis": AXIS}``."""
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - {"rules", "mesh", "batch_axes", "head_axis"})
        if unknown or "rules" not in data:
            raise ShardingError(f"scheme file {path}: a mapping needs 'rules' (and may have mesh, batch_axes, "
                                f"head_axis); found keys {sorted(data)}")  # fmt: skip
        mesh = data.get("mesh")
        if mesh is not None and not (isinstance(mesh, Mapping) and all(isinstance(k, str) and isinstance(v, int) for k, v in mesh.items())):
            raise ShardingError(f"scheme file {path}: 'mesh' must map axis names to sizes, got {mesh!r}")
        batch_axes = data.get("batch_axes", [])
        if not (isinstance(batch_axes, list) and all(isinstance(a, str) for a in batch_axes)):
            raise ShardingError(f"scheme file {path}: 'batch_axes' must be a list of axis names, got {batch_axes!r}")
        head_axis = data.get("head_axis")
        if head_axis is not None and not isinstance(head_axis, str):
            raise ShardingError(f"scheme file {path}: 'head_axis' must be an axis name, got {head_axis!r}")
        rows = data["rules"]
        mesh = tuple(mesh.items()) if mesh is not None else None
    else:
        rows, mesh, batch_axes, head_axis = data, None, [], None
    if not isinstance(rows, list) or not rows:
        raise ShardingError(f"scheme file {path} must hold a non-empty list of [regex, spec] rows, got {type(rows).__name__}")
    return scheme_from_rows(name, rows, mesh=mesh, batch_axes=tuple(batch_axes), head_axis=head_axis)


def get_scheme(name_or_path: str | Scheme) -> Scheme:
    """A built-in scheme by name, ``file.py:NAME`` (a Scheme or a list of rules), or a JSON/YAML file."""
    if isinstance(name_or_path, Scheme):
        return name_or_path
    if name_or_path in SCHEMES:
        return SCHEMES[name_or_path]
    path, _, attr = name_or_path.partition(":")
    if path.endswith(".py"):
        if not Path(path).is_file():
            raise ShardingError(f"scheme file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"user_scheme_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's own Python: any error at all
            raise ShardingError(f"scheme file {path} fails to run ({type(e).__name__}: {e})") from None
        attr = attr or "SCHEME"
        if not hasattr(module, attr):
            raise ShardingError(f"{path} defines no {attr!r}; name the table: {path}:NAME")
        obj = getattr(module, attr)
        if isinstance(obj, Scheme):
            for pattern, spec in obj.rules:
                check_spec(spec, f"scheme {obj.name!r}, rule {pattern!r}")
            return obj
        if not isinstance(obj, (list, tuple)):
            raise ShardingError(f"{path}:{attr} is a {type(obj).__name__}; it must be a Scheme or a list of (regex, spec) rows")
        return scheme_from_rows(attr, obj)
    if path.endswith((".json", ".yaml", ".yml")):
        if not Path(path).is_file():
            raise ShardingError(f"scheme file {path} does not exist")
        try:
            text = Path(path).read_text()
            if path.endswith(".json"):
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # OSError, UnicodeDecodeError, JSONDecodeError, yaml.YAMLError
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            kind = "JSON" if path.endswith(".json") else "YAML"
            raise ShardingError(f"scheme file {path} is not valid {kind} ({msg}); it holds a list of [regex, spec] rows") from None
        return _scheme_from_data(Path(path).stem, data, path)
    raise ShardingError(
        f"unknown sharding scheme {name_or_path!r}; choose one of {', '.join(SCHEMES)} "
        f"or pass a rules file (rules.py:NAME, rules.json, rules.yaml)"
    )


# ---------------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------------
def parse_mesh(text: str | None) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``."""
    if not text:
        return {}
    sizes = {}
    for part in text.split(","):
        name, eq, size = part.partition("=")
        if not eq or not size.strip().lstrip("-").isdigit():
            raise ShardingError(f"--mesh expects name=size pairs like data=2,model=4, got {text!r}")
        if name.strip() in sizes:
            raise ShardingError(f"--mesh names axis {name.strip()!r} twice in {text!r}; give each axis once")
        sizes[name.strip()] = int(size)
    return sizes


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with Auto axis types (jax >= 0.9 defaults to Explicit, where Megatron sharding fails)."""
    devices = list(devices if devices is not None else jax.devices())
    need = math.prod(axis_sizes.values())
    if need != len(devices):
        raise ShardingError(
            f"mesh {_fmt_mesh(axis_sizes)} needs {need} devices, {len(devices)} available; "
            f"pass --devices {need} or a --mesh whose sizes multiply to {len(devices)}"
        )
    return jax.make_mesh(
        tuple(axis_sizes.values()),
        tuple(axis_sizes.keys()),
        axis_types=(AxisType.Auto,) * len(axis_sizes),
        devices=devices,
    )


def mesh_for(scheme: Scheme | str, num_devices: int | None = None, overrides=None, devices=None) -> Mesh:
    scheme = get_scheme(scheme)
    devices = list(devices if devices is not None else jax.devices())
    n = num_devices or len(devices)
    return make_mesh(scheme.mesh_shape(n, overrides), devices[:n])


# ---------------------------------------------------------------------------------------------------
# Resolving specs
# ---------------------------------------------------------------------------------------------------
def _spec_axes(spec) -> list[str]:
    if isinstance(spec, ShardLargest):
        return [spec.axis]
    out = []
    for e in spec:
        if e is None:
            continue
        out.extend(e if isinstance(e, tuple) else (e,))
    return out


def _axis_size(mesh_shape: Mapping[str, int], entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh_shape[n] for n in names)


@dataclasses.dataclass
class Placement:
    name: str
    shape: tuple[int, ...]
    dtype: Any
    spec: P
    rule: str  # the regex that matched
    fallback: str | None = None  # why the rule's spec was replaced by replication
    # Vocab-parallel embedding / head whose vocab does not divide the axis: dim 0 padded with zero
    # rows from ``padded_from`` to ``shape[0]`` (as Megatron and vLLM do); logits are cut back.
    padded_from: int | None = None

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def bytes_total(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def shard_shape(self, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d // _axis_size(mesh_shape, e) for d, e in zip(self.shape, tuple(self.spec) + (None,) * 8))

    def bytes_per_device(self, mesh_shape: Mapping[str, int]) -> int:
        return math.prod(self.shard_shape(mesh_shape)) * self.itemsize

    @property
    def replicated(self) -> bool:
        return all(e is None for e in self.spec)


def _suggest_sizes(dims: Iterable[int], limit: int) -> list[int]:
    return [k for k in range(1, limit + 1) if all(d % k == 0 for d in dims)]


def resolve_placements(
    shapes: Mapping[str, tuple[tuple[int, ...], Any]],
    scheme: Scheme,
    mesh_shape: Mapping[str, int],
    *,
    head_layout: Sequence[tuple[str, int, int]] = (),
    fallback: str = "error",
) -> dict[str, Placement]:
    """Resolves each parameter's spec by the scheme's first matching rule, and validates it.

    ``shapes`` maps name -> (shape, dtype). ``head_layout`` lists (regex, dim, unit): a tensor whose
    name matches must be split on ``dim`` only in multiples of ``unit`` (the head size), so no device
    holds part of a head. ``fallback="replicate"`` replicates a tensor whose rule does not fit, with a
    warning, instead of raising. ``scheme`` is a ``Scheme``: names and files are read once, at the
    edge (``get_scheme``), not again at every step inside.
    """
    if fallback not in ("error", "replicate"):
        raise ShardingError(f"fallback must be 'error' or 'replicate', got {fallback!r}")
    for a in scheme.axis_names:
        if a not in mesh_shape:
            raise ShardingError(f"scheme {scheme.name!r} uses mesh axis {a!r}, the mesh has {list(mesh_shape)}")
    compiled = [(re.compile(p), p, spec) for p, spec in scheme.rules]
    out: dict[str, Placement] = {}
    problems: list[str] = []
    for name, (shape, dtype) in shapes.items():
        shape = tuple(shape)
        match = next(((p, spec) for rx, p, spec in compiled if rx.search(name)), None)
        if match is None:
            raise ShardingError(
                f"parameter {name} {list(shape)} matches no rule of scheme {scheme.name!r}; add a rule "
                f"for it or end the table with a catch-all ('.*', [])"
            )
        pattern, spec = match
        for a in _spec_axes(spec):
            if a not in mesh_shape:
                raise ShardingError(
                    f"rule {pattern!r} of scheme {scheme.name!r} names mesh axis {a!r}, "
                    f"the mesh has axes {list(mesh_shape)}"
                )
        if isinstance(spec, ShardLargest):
            size = mesh_shape[spec.axis]
            spec = ()
            if math.prod(shape) >= spec_min(match[1]) and size > 1:
                divisible = [i for i, d in enumerate(shape) if d % size == 0]
                if divisible:
                    dim = max(divisible, key=lambda i: (shape[i], -i))
                    spec = (None,) * dim + (match[1].axis,)
        while scheme.trim_specs and len(spec) > len(shape) and spec[-1] is None:  # (axis, None) fits a 1-D scale
            spec = spec[:-1]
        if len(spec) > len(shape):
            raise ShardingError(
                f"rule {pattern!r} gives {name} {list(shape)} a spec of rank {len(spec)} > its rank {len(shape)}"
            )
        problem = None
        padded_from = None
        for dim, entry in enumerate(spec):
            k = _axis_size(mesh_shape, entry)
            if dim == 0 and shape[0] % k and VOCAB_TENSOR.search(name):
                # Vocab-parallel: pad the vocab rows to a multiple of the axis (logits are cut back).
                padded_from, shape = shape[0], (-(-shape[0] // k) * k, *shape[1:])
            if shape[dim] % k:
                fits = _suggest_sizes([shape[dim]], k * 2)
                problem = (
                    f"{name} {list(shape)}: dim {dim} ({shape[dim]}) does not divide by mesh axis "
                    f"{entry!r} of size {k} (rule {pattern!r}); axis sizes that fit: "
                    f"{', '.join(map(str, fits))}"
                )
                break
            # Only a tensor-parallel split (over the scheme's head axis) must keep heads whole; a
            # weight FSDP splits on another axis is gathered whole before use.
            entry_axes = entry if isinstance(entry, tuple) else (entry,)
            for rx_text, hdim, unit in head_layout if scheme.head_axis in entry_axes else ():
                if hdim == dim and k > 1 and re.search(rx_text, name) and (shape[dim] // k) % unit:
                    heads = shape[dim] // unit
                    fits = [
                        s
                        for s in _suggest_sizes(_head_counts(shapes, head_layout), max(k, heads))
                        if s > 1
                    ]
                    problem = (
                        f"{name} {list(shape)}: splitting dim {dim} over {entry!r} ({k} devices) would "
                        f"split attention heads ({heads} heads of size {unit}) across devices "
                        f"(rule {pattern!r}); a model axis of {' or '.join(map(str, fits)) or '1'} "
                        f"fits every head count"
                    )
                    break
            if problem:
                break
        fallback_reason = None
        if problem:
            if fallback == "error":
                problems.append(problem)
            else:
                fallback_reason = problem
                spec = ()
        if fallback_reason and padded_from is not None:  # replicated after all: no padding needed
            shape, padded_from = (padded_from, *shape[1:]), None
        out[name] = Placement(name, shape, dtype, P(*spec), pattern, fallback_reason, padded_from)
    # A head's bias or scale kept whole still needs the padded rows: GPT-J's ``lm_head.bias`` beside its
    # weight, RoBERTa's ``lm_head.bias`` beside a head tied to the (padded) embedding.
    vocab_padded = [p for p in out.values() if p.padded_from is not None]
    for name, p in out.items():
        head = re.sub(r"(bias|scale)$", "weight", name)
        padded = None
        if head != name and VOCAB_TENSOR.search(name):
            padded = out.get(head) or next((v for v in vocab_padded if v.padded_from == p.shape[0]), None)
        if padded is not None and padded.padded_from == p.shape[0] and p.padded_from is None:
            out[name] = dataclasses.replace(p, shape=(padded.shape[0], *p.shape[1:]), padded_from=p.shape[0])
    for line in fallback_summary(out):
        warnings.warn(line, stacklevel=2)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ShardingError(
            f"scheme {scheme.name!r} on mesh {_fmt_mesh(mesh_shape)}: {problems[0]}{more}. "
            f"Use a mesh that fits, or --fallback replicate to replicate such tensors instead"
        )
    return out


def fallback_summary(placements: Mapping[str, Placement]) -> list[str]:
    """One line per rule whose tensors were replicated by the fallback, with the first reason."""
    by_rule: dict[str, list[Placement]] = {}
    for p in placements.values():
        if p.fallback:
            by_rule.setdefault(p.rule, []).append(p)
    return [
        f"fallback: {len(ps)} tensor(s) matching {rule!r} replicated; first: {ps[0].fallback}"
        for rule, ps in by_rule.items()
    ]


def spec_min(spec) -> int:
    return spec.min_elements if isinstance(spec, ShardLargest) else 0


def _head_counts(shapes, head_layout) -> list[int]:
    counts = set()
    for name, (shape, _) in shapes.items():
        for rx_text, dim, unit in head_layout:
            if re.search(rx_text, name) and len(shape) > dim:
                counts.add(shape[dim] // unit)
    return sorted(counts)


# ---------------------------------------------------------------------------------------------------
# Placing arrays
# ---------------------------------------------------------------------------------------------------
def pad_rows(value, p: Placement):
    """``value`` with dim 0 zero-padded to the placement's shape (a vocab that does not divide)."""
    if p.padded_from is None:
        return value
    value = np.asarray(value)
    return np.pad(value, [(0, p.shape[0] - value.shape[0])] + [(0, 0)] * (value.ndim - 1))


def put_global(value, named: NamedSharding) -> jax.Array:
    """An array on ``named``'s devices, each device filled with only its slice of ``value``.

    Works the same in one process and in several (every process passes the same full value and fills
    only its own devices), unlike device_put of a host array onto devices of other processes.
    """
    if isinstance(value, jax.Array) and value.is_fully_addressable and len(value.devices()) == 1:
        if jax.process_count() == 1:
            return jax.device_put(value, named)
        value = np.asarray(value)
    return jax.make_array_from_callback(tuple(value.shape), named, lambda index: value[index])


def to_host(x) -> np.ndarray:
    """The whole value of a (possibly multi-process) array on this host."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shardings_of(placements: Mapping[str, Placement], mesh: Mesh) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, p.spec) for k, p in placements.items()}


def batch_spec(scheme: Scheme, mesh: Mesh, batch: int, rank: int = 2) -> P:
    """Inputs: batch dim over the scheme's batch axes when they divide it, else replicated."""
    axes = tuple(a for a in scheme.batch_axes if a in mesh.shape)
    if not axes or batch % math.prod(mesh.shape[a] for a in axes):
        return P()
    return P(axes if len(axes) > 1 else axes[0], *([None] * (rank - 1)))


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------
def replicated_because(p: Placement) -> str | None:
    """Why a tensor is on every device whole (None when it is split)."""
    if not p.replicated:
        return None
    if p.fallback:
        return f"fallback: {p.fallback}"
    if p.rule == CATCH_ALL:
        return "no rule of the scheme splits it (catch-all row)"
    return f"rule {p.rule!r} replicates it"


def report(placements: Mapping[str, Placement], mesh_shape: Mapping[str, int]) -> dict[str, Any]:
    rows = []
    total = per_device = replicated = 0
    for p in placements.values():
        b = p.bytes_total()
        d = p.bytes_per_device(mesh_shape)
        total += b
        per_device += d
        replicated += b if p.replicated else 0
        rows.append(
            {
                "name": p.name,
                "shape": list(p.shape),
                "dtype": str(np.dtype(p.dtype)),
                "spec": str(p.spec),
                "bytes_per_device": d,
                "fallback": p.fallback,
                "replicated_because": replicated_because(p),
                "padded_from": p.padded_from,
            }
        )
    return {
        "rows": rows,
        "mesh": dict(mesh_shape),
        "param_bytes_total": total,
        "param_bytes_per_device": per_device,
        "replicated_fraction": replicated / total if total else 0.0,
    }


def format_report(rep: Mapping[str, Any], max_rows: int | None = None) -> str:
    rows = rep["rows"] if max_rows is None else rep["rows"][:max_rows]
    w = max([len(r["name"]) for r in rows] + [4])
    lines = [f"{'name':<{w}}  {'shape':<16} {'spec':<28} {'bytes/device':>13}"]
    for r in rows:
        flag = "  (fallback: replicated)" if r["fallback"] else ""
        lines.append(
            f"{r['name']:<{w}}  {str(r['shape']):<16} {r['spec']:<28} {r['bytes_per_device']:>13,}{flag}"
        )
    if max_rows is not None and len(rep["rows"]) > max_rows:
        lines.append(f"... {len(rep['rows']) - max_rows} more")
    lines.append(
        f"mesh {_fmt_mesh(rep['mesh'])}: parameter bytes per device {rep['param_bytes_per_device']:,} of "
        f"{rep['param_bytes_total']:,} total; {rep['replicated_fraction']:.1%} of parameter bytes replicated"
    )
    return "\n".join(lines)
