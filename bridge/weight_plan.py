"""The weight plan: for every weight a lifted program sees, where it comes from, what is done to it on
the way, and where it is placed. One pure function makes it; three executors carry it out.

    plan = plan_weights(model, {"model": 8}, "tp")       # names and shapes only: a meta model will do
    plan.weights["model.layers.*.self_attn.k_proj.weight"]
    # PlannedWeight(sources=('model.layers.0.self_attn.k_proj.weight', ...),
    #               transforms=('repeat_kv_heads', 'stack_layers'), placement=Placement(spec=P(None, 'model', None)))

The executors:
  * ``place_weights``: a torch module's extracted tensors, on the mesh (``lift``);
  * ``load_weights``: each device's slice read from the checkpoint's safetensors straight into place,
    one process or many (``lift_checkpoint``, ``launch``);
  * ``abstract_weights``: ``jax.ShapeDtypeStruct``s carrying their shardings (``plan``, ``compare``).

The transforms, in order: a fused projection split (a module rewrite before the names are read:
``split_fused_projections``), kv heads repeated for a head axis wider than their count
(``repeat_kv_heads``), decoder layers stacked for a scanned stack (``stack_layers``), vocabulary
rows padded to divide their axis (``pad_vocab``). Quantization happens on the module before it is
planned (int8 weights and their scales are tensors like any other). Placements are resolved here
and only here (``sharding.resolve_placements``), so every path places the same model the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

import sharding
from bridge import scan
from bridge.extract import extract_fn, jax_dtype

REPEAT_KV_HEADS = "repeat_kv_heads"
STACK_LAYERS = "stack_layers"
PAD_VOCAB = "pad_vocab"


@dataclasses.dataclass(frozen=True)
class PlannedWeight:
    name: str  # as the program sees it (stacked: ``model.layers.*.mlp.up_proj.weight``)
    sources: tuple[str, ...]  # the module's tensors it is made from: one, or one per layer in order
    transforms: tuple[str, ...]  # applied in this order
    placement: sharding.Placement
    kv_head_dim: int | None = None  # the head size of a weight whose kv heads are repeated


@dataclasses.dataclass
class WeightPlan:
    scheme: sharding.Scheme  # normalised once, with the model's own plan merged in
    mesh_shape: dict[str, int]
    weights: dict[str, PlannedWeight]
    kv_head_copies: int = 1
    scan_layers: bool = False
    split_projections: bool = False  # fused projections were split: the module's names changed

    @property
    def placements(self) -> dict[str, sharding.Placement]:
        return {k: w.placement for k, w in self.weights.items()}


def as_scheme(table) -> sharding.Scheme:
    """A ``Scheme`` from a scheme, a built-in name or rules file, or a list of ``(regex, spec)`` rows
    (a table written in a script: its mesh axes are taken from the specs, in order)."""
    if isinstance(table, (list, tuple)):
        return sharding.scheme_from_rows("custom", table)
    return sharding.get_scheme(table)


def is_causal_lm(model) -> bool:
    from model_torch.contract import CausalLMContract

    return isinstance(model, CausalLMContract)


def module_shapes(model) -> dict[str, tuple[tuple[int, ...], object]]:
    """name -> (shape, jax dtype) of the tensors torchax extracts from ``model`` (tied ones once),
    without reading any data (a meta model will do)."""
    names, _ = extract_fn(model)
    return {k: (tuple(shape), jax_dtype(dt)) for k, (shape, dt) in names.items()}


def kv_head_copies(model, mesh_shape: Mapping[str, int], scheme: sharding.Scheme) -> int:
    """How many times to repeat each kv head so the scheme's head axis splits them (as vLLM does for
    tp > kv heads): 1 unless the axis is wider than the kv heads, divisible by them, the query heads
    still split, and the model says which weights hold its kv heads (``kv_projections``)."""
    if not is_causal_lm(model):
        return 1
    n = mesh_shape.get(scheme.head_axis, 1) if scheme.head_axis else 1
    kv = model.kv_cache_heads
    if not kv or n <= kv or n % kv or not model.kv_projections() or model.query_heads % n:  # kv 0: no attention (Mamba)
        return 1
    return n // kv


def kv_head_dim(model) -> Callable[[str], int | None]:
    """name -> head_dim for the weights holding kv heads on dim 0 (``kv_projections``), else None."""
    rules = [(re.compile(rx), d) for rx, d in model.kv_projections()]
    return lambda name: next((d for rx, d in rules if rx.search(name)), None)


def plan_weights(model, mesh_shape: Mapping[str, int], scheme, *, fallback: str = "error",
                 scan_layers: bool = False) -> WeightPlan:  # fmt: skip
    """The plan of ``model`` (any ``nn.Module``; a causal LM's contract adds its own tensor-parallel
    plan, head layout and kv heads) on a mesh of ``mesh_shape`` by ``scheme`` (a ``Scheme``, a
    built-in name or rules file, or ``(regex, spec)`` rows). Names and shapes are read from the
    module after any split, data untouched.

    A causal LM's fused projections are split first when the head axis is wider than 1: that
    rewrites the module (idempotent), as a tensor-parallel load must. Raises ``ShardingError`` when
    the scheme does not fit (``fallback='replicate'``: such tensors are replicated instead)."""
    scheme = as_scheme(scheme)
    mesh_shape = dict(mesh_shape)
    causal = is_causal_lm(model)
    head_layout = ()
    copies, split = 1, False
    if causal:
        if scheme.head_axis and mesh_shape.get(scheme.head_axis, 1) > 1:
            before = set(model.state_dict())
            model.split_fused_projections()
            split = set(model.state_dict()) != before
        scheme = scheme.with_model_plan(model.parallel_plan())
        head_layout = model.head_layout()
        copies = kv_head_copies(model, mesh_shape, scheme)
    shapes = module_shapes(model)
    head_dim = kv_head_dim(model) if copies > 1 else (lambda name: None)
    transforms: dict[str, tuple[str, ...]] = {}
    for name, (shape, dtype) in list(shapes.items()):
        if head_dim(name):
            shapes[name] = ((shape[0] * copies, *shape[1:]), dtype)
            transforms[name] = (REPEAT_KV_HEADS,)
    layer_names: dict[str, list[str]] = {}
    if scan_layers:
        shapes, layer_names = scan.stack_layout(model, shapes)
    # Rules match per-layer names and shapes: a stacked tensor is resolved as its layer 0 and gets an
    # unsharded layer dim in front, so one table serves both layouts.
    per_layer = {}
    for name, (shape, dtype) in shapes.items():
        per_layer[scan.layer0_name(name) if name in layer_names else name] = (
            tuple(shape[1:]) if name in layer_names else tuple(shape), dtype)  # fmt: skip
    resolved = sharding.resolve_placements(per_layer, scheme, mesh_shape, head_layout=head_layout, fallback=fallback)
    weights = {}
    for name in shapes:
        if name in layer_names:
            first = layer_names[name][0]
            p = resolved[scan.layer0_name(name)]
            p = dataclasses.replace(p, name=name, shape=(len(layer_names[name]), *p.shape), spec=sharding.P(None, *p.spec))
            steps = (*transforms.get(first, ()), STACK_LAYERS)
            sources = tuple(layer_names[name])
        else:
            p = resolved[name]
            steps, sources, first = transforms.get(name, ()), (name,), name
        if p.padded_from is not None:
            steps = (*steps, PAD_VOCAB)
        weights[name] = PlannedWeight(name, sources, steps, p, head_dim(first))
    return WeightPlan(scheme, mesh_shape, weights, copies, bool(layer_names) or scan_layers, split)


def check_fits(plan: WeightPlan, mesh: Mesh) -> None:
    """Refuses, before anything is placed, a plan whose weights cannot fit where they would live
    (``device_memory``). Off with ``TORCHAX_BRIDGE_MEMORY_CHECK=0``."""
    from bridge.devices import device_memory
    from bridge.errors import DoesNotFit

    memory = device_memory(mesh)
    if memory is None:
        return
    have, sharing, where = memory
    per_device = sum(w.placement.bytes_per_device(plan.mesh_shape) for w in plan.weights.values())
    if per_device * sharing > have:
        dtypes = {np.dtype(w.placement.dtype).name for w in plan.weights.values()}
        raise DoesNotFit(f"the weights need {per_device * sharing / 2**30:.1f} GiB ({per_device / 2**30:.2f} GiB on each "
                         f"of {sharing} device(s), {'/'.join(sorted(dtypes))}) but {where}; use --dtype bfloat16 or "
                         f"--quantize int8, shard over more devices (--scheme tp/fsdp), or a smaller model")  # fmt: skip


# -- executors ---------------------------------------------------------------------------------------
def abstract_weights(plan: WeightPlan, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Every weight as a ``ShapeDtypeStruct`` carrying its sharding: nothing allocated."""
    return {k: jax.ShapeDtypeStruct(w.placement.shape, w.placement.dtype, sharding=NamedSharding(mesh, w.placement.spec))
            for k, w in plan.weights.items()}  # fmt: skip


def repeat_heads(w, head_dim: int, copies: int):
    """Each kv head's rows repeated ``copies`` times in place (head j -> j, j, ..., j): query heads
    group under their kv head by position, so group i of the wider layout reads a copy of the same
    head as before, and each device holds only the copy its query heads use."""
    heads = w.shape[0] // head_dim
    return jnp.repeat(jnp.asarray(w).reshape(heads, head_dim, *w.shape[1:]), copies, axis=0).reshape(
        heads * copies * head_dim, *w.shape[1:])  # fmt: skip


def place_weights(plan: WeightPlan, tensors: Mapping[str, object], mesh: Mesh) -> dict[str, jax.Array]:
    """A module's extracted tensors (by name) transformed as planned and put on the mesh."""
    out = {}
    for name, w in plan.weights.items():
        parts = [tensors[s] for s in w.sources]
        if REPEAT_KV_HEADS in w.transforms:
            parts = [repeat_heads(t, w.kv_head_dim, plan.kv_head_copies) for t in parts]
        value = jnp.stack([jnp.asarray(t) for t in parts]) if STACK_LAYERS in w.transforms else parts[0]
        out[name] = sharding.put_global(sharding.pad_rows(value, w.placement), NamedSharding(mesh, w.placement.spec))
    return out


def read_slice(w: PlannedWeight, copies: int, read: Callable, source: str, index: tuple, shape: tuple, dtype):
    """One device's slice ``index`` of a planned (per-layer) tensor of ``shape``, read from the
    stored tensor ``source`` by ``read(source, index)``: kv heads repeated and vocab rows padded as
    planned, without reading more of the stored tensor than the slice needs."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    rows = range(shape[0])[index[0]]  # a contiguous block (a shard)
    if PAD_VOCAB in w.transforms:  # rows past the stored ones are zeros
        out = np.zeros([len(range(d)[i]) for d, i in zip(shape, index)], dtype)
        real = range(rows.start, min(rows.stop, w.placement.padded_from))
        if len(real):
            out[: len(real)] = read(source, (slice(real.start, real.stop), *index[1:]))
        return out
    if REPEAT_KV_HEADS in w.transforms and len(rows):
        d = w.kv_head_dim
        first, last = rows.start // d // copies, (rows.stop - 1) // d // copies  # stored heads in the slice
        block = np.asarray(read(source, (slice(first * d, (last + 1) * d), *index[1:])))
        block = np.repeat(block.reshape(last + 1 - first, d, *block.shape[1:]), copies, axis=0).reshape(-1, *block.shape[1:])
        start = rows.start - first * d * copies
        return block[start : start + len(rows)].astype(dtype, copy=False)
    shard = np.asarray(read(source, index))
    return shard if shard.dtype == dtype else shard.astype(dtype)


def load_weights(plan: WeightPlan, read: Callable, mesh: Mesh, label: str = "placing") -> dict[str, jax.Array]:
    """Each device's slice of every planned weight read from stored weights (``read(name, index)``
    -> numpy, by the module's names: ``checkpoints.StoredWeights.read``) straight into place
    (``jax.make_array_from_callback``), transformed as planned, in the dtype the plan places it
    in. In one process or many: each process reads only its own devices' slices. No full copy of
    the model is held besides the placed weights."""
    from bridge import checkpoints

    def place(name: str) -> jax.Array:
        w = plan.weights[name]
        p = w.placement
        if STACK_LAYERS in w.transforms:
            # Allocated on the mesh, then each layer's slice read and written into it in place
            # (donated), so at most one layer is in flight besides the placed weights. Stacking whole
            # tensors on the host first peaked at 1.89x SmolLM2's checkpoint; layer by layer it stays
            # at the unrolled peak.
            layer_spec = NamedSharding(mesh, scan.layer_placement(p).spec)
            out = jax.jit(lambda: jnp.zeros(p.shape, p.dtype), out_shardings=NamedSharding(mesh, p.spec))()
            for i, k in enumerate(w.sources):
                piece = jax.make_array_from_callback(p.shape[1:], layer_spec, lambda index, k=k: read_slice(
                    w, plan.kv_head_copies, read, k, index, p.shape[1:], p.dtype))  # fmt: skip
                # Waited for: dispatch is asynchronous, and reading ran ahead of the writes, each
                # layer's piece alive until its write ran (Llama-3-8B bf16 scanned peaked at 1.23x
                # its weights, against 1.08x unrolled).
                out = jax.block_until_ready(_write_layer(out, piece, i))
            return out
        return jax.make_array_from_callback(p.shape, NamedSharding(mesh, p.spec), lambda index: read_slice(
            w, plan.kv_head_copies, read, w.sources[0], index, p.shape, p.dtype))  # fmt: skip

    # Two tensors in flight: reading one overlaps placing the other. Measured on SmolLM2: 1 worker
    # 0.9 s / 1.23x the checkpoint at peak, 2 workers 0.5-0.8 s / 1.26x, 4 workers 0.75 s / 1.37-1.41x.
    return checkpoints.map_tensors(place, plan.placements, label, workers=2)


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: jax.Array, layer: jax.Array, i) -> jax.Array:
    """``stacked[i] = layer``, in place."""
    return jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0)
