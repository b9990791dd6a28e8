r"""The core flow: torch module -> ``torchax.extract_jax`` -> weights on a mesh by rule table -> jit.

    lifted = lift(my_module, mesh, [(r"blocks\.\d+\.fc1\.weight$", ("model", None)), (r".*", ())])
    out = lifted(images, mask=mask)            # jitted, compiled once per input shape

    lm = lift(causal_lm, mesh, "tp")           # a causal LM: weights by sharding.SCHEMES["tp"]
    logits = lm.forward(input_ids)

``lifted.fn(weights, args, kwargs)`` is the pure JAX function of the module's ``forward``; everything
else (generation, profiling, checking, exporting, comparisons) is built on it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding

import sharding
from bridge import scan, weight_plan
from bridge.errors import UsageError
from bridge.extract import extract, extract_fn, jax_dtype, modes_of  # noqa: F401 (the lifting API)
from bridge.weight_plan import as_scheme, is_causal_lm  # noqa: F401


def constrain(fn, model: torch.nn.Module, mesh: Mesh, scheme: sharding.Scheme):
    """``fn`` with each decoder layer's output pinned to the scheme's batch spec while it is traced
    (a forward hook through torchax interop; model_torch stays free of JAX). A no-op for schemes
    that do not ask for it."""
    if not scheme.constrain_activations:
        return fn
    from torchax.interop import call_jax

    # Decoder layers and every projection inside them (their leaf modules): pinning each matmul's
    # output to the batch spec leaves XLA one way to compute it (gather the weight), which is what
    # FSDP means.
    layers = []
    for _, layer in model.decoder_layers():
        layers.append(layer)
        layers += [m for m in layer.modules() if m is not layer and not list(m.children())]

    def pin_one(x):
        spec = sharding.batch_spec(scheme, mesh, x.shape[0], x.ndim)
        return call_jax(lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec)), x)

    def pin(module, args, out):
        if isinstance(out, tuple):  # a decoder layer: (hidden, kv)
            return (pin_one(out[0]), *out[1:])
        return pin_one(out) if isinstance(out, torch.Tensor) and out.ndim >= 2 else out

    def constrained(weights, args, kwargs=None):
        handles = [m.register_forward_hook(pin) for m in layers]
        try:
            return fn(weights, args, kwargs)
        finally:
            for h in handles:
                h.remove()

    return constrained


def cut_padded_vocab(fn, model, placements):
    """``fn`` returning logits at the model's true vocab size when the embedding/head was padded to
    divide the mesh axis (the padded rows are zeros; their logits are dropped)."""
    if not any(p.padded_from is not None for p in placements.values()):
        return fn
    vocab = model.vocab_size

    def cut(weights, args, kwargs=None):
        logits, *rest = fn(weights, args, kwargs)
        return (logits[..., :vocab], *rest)

    return cut


@dataclasses.dataclass
class LiftedModule:
    """Any ``nn.Module`` lifted: its weights on a mesh, its forward a pure JAX function.

    ``lifted(*args, **kwargs)`` runs the jitted forward: tensor inputs (torch, numpy or jax) are put
    on the mesh with their first dim over the scheme's batch axes (replicated when those do not
    divide it); anything else (ints, flags, None) is a static argument. Outputs keep the module's
    structure (a tensor, a tuple, a dict) with jax arrays in place of tensors. One compile per input
    shape and static value, as ``jax.jit``.
    """

    model: torch.nn.Module
    fn: Any  # fn(weights, args_tuple, kwargs_dict) -> the forward's outputs as jax arrays
    weights: dict[str, jax.Array]  # or jax.ShapeDtypeStruct for an abstract plan
    mesh: Mesh
    scheme: sharding.Scheme
    placements: dict[str, sharding.Placement]
    plan: Any = None  # the bridge.weight_plan.WeightPlan its weights were placed by

    def __post_init__(self):
        self._calls = {}
        self._train_calls = 0  # train-mode calls so far: each draws its own dropout key
        self.stored = None  # the checkpoints.StoredWeights it was placed from, if it was

    def input_sharding(self, batch: int, rank: int = 2) -> NamedSharding:
        return NamedSharding(self.mesh, sharding.batch_spec(self.scheme, self.mesh, batch, rank))

    def put(self, x) -> jax.Array:
        """A tensor input on the mesh, dim 0 over the batch axes (a scalar: replicated)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            return sharding.put_global(x, NamedSharding(self.mesh, sharding.P()))
        return sharding.put_global(x, self.input_sharding(x.shape[0], x.ndim))

    def report(self) -> dict:
        return sharding.report(self.placements, dict(self.mesh.shape))

    def jitted(self, args: tuple, kwargs: dict, name: str = "forward", training: bool = False):
        """(the jitted call for these arguments' structure and static values, its array arguments).
        ``name`` names the program (profiles and HLO dumps tell programs apart by it).
        ``training``: the program of the module in the modes its submodules have now (part of the
        key), called as ``call(weights, key, arrays) -> (outputs, buffers)`` (``Extracted.training``)."""
        leaves, tree = jax.tree.flatten((tuple(args), dict(kwargs)))
        is_array = tuple(isinstance(x, (torch.Tensor, np.ndarray, jax.Array)) for x in leaves)
        statics = tuple(x for x, a in zip(leaves, is_array) if not a)
        arrays = [self.put(x) for x, a in zip(leaves, is_array) if a]
        key = (tree, is_array, statics, name, modes_of(self.model) if training else None)
        if key not in self._calls:

            def inputs(arrays):
                it, st = iter(arrays), iter(statics)
                return jax.tree.unflatten(tree, [next(it) if arr else next(st) for arr in is_array])

            if training:
                placed = {k: w.sharding for k, w in self.weights.items() if isinstance(w, jax.Array)}

                def call(weights, rng, arrays):
                    out, buffers = self.fn.training(weights, rng, *inputs(arrays))
                    # the buffers stay where the plan put them
                    return out, {k: jax.lax.with_sharding_constraint(v, placed[k]) if k in placed else v
                                 for k, v in buffers.items()}  # fmt: skip
            else:

                def call(weights, arrays):
                    return self.fn(weights, *inputs(arrays))

            call.__name__ = call.__qualname__ = name
            self._calls[key] = jax.jit(call)
        return self._calls[key], arrays

    def __call__(self, *args, **kwargs):
        """The module's forward on the mesh, in the module's mode: in train mode (``module.train()``)
        batch statistics normalise, dropout draws a fresh key each call, and the updated buffers
        (running statistics, counters) replace the lifted ones, as eager torch updates its module's."""
        if not any(modes_of(self.model)):
            call, arrays = self.jitted(args, kwargs)
            return call(self.weights, arrays)
        if not hasattr(self.fn, "training"):
            raise UsageError(f"{type(self.model).__name__} is in train mode, which its lifted program does not "
                             f"support (a causal LM's is for inference); call .eval() on it")  # fmt: skip
        call, arrays = self.jitted(args, kwargs, training=True)
        self._train_calls += 1
        rng = jax.random.fold_in(jax.random.key(torch.initial_seed() % (1 << 63)), self._train_calls)
        out, buffers = call(self.weights, rng, arrays)
        self.weights.update(buffers)
        return out

    def to_torch(self) -> torch.nn.Module:
        """The lifted weights and buffers written back into the module (trained weights, running
        statistics), which it returns. Weights the plan transformed (stacked, padded, repeated kv
        heads) have no one-to-one tensor in the module: refused, naming one."""
        planned = self.plan.weights.values() if self.plan else ()
        transformed = [w for w in planned if set(w.transforms) - {weight_plan.STACK_LAYERS}]
        if transformed:
            raise UsageError(f"{transformed[0].name} was {', '.join(transformed[0].transforms)} on the mesh, so it "
                             f"has no one tensor in the module to write back; lift without that transform")  # fmt: skip
        tensors = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        with torch.no_grad():
            for name, w in scan.unstack_weights(self.weights).items():  # a scanned stack: per layer
                value = np.asarray(sharding.to_host(w))
                t = tensors[name]
                t.copy_(torch.from_numpy(value.copy()).to(t.dtype))
        return self.model


@dataclasses.dataclass
class Lifted(LiftedModule):
    """A causal LM lifted (a ``model_torch.contract.CausalLMContract``): ``fn`` returns
    ``(logits, kv_cache)``; generation, the KV cache on the mesh and the LM commands build on it."""

    tokenizer: Any = None  # set by bridge.models.open_model when the checkpoint has one
    source: str = ""  # what it was opened from
    # Each kv head repeated this many times in the k/v weights and the cache, so a tensor-parallel
    # axis wider than the kv head count still splits them (``weight_plan.repeat_heads``).
    kv_head_copies: int = 1
    scan_layers: bool = False  # the decoder stack is one scan over stacked weights (bridge.scan)
    hf_config: Any = None  # the transformers config it was opened with (bridge.models.open_model), to save with

    def __post_init__(self):
        super().__post_init__()
        self._forward = {}

    # -- weights by state-dict name, in either layout ---------------------------------------------
    def placement(self, name: str) -> sharding.Placement:
        """Where the weight ``name`` (a state-dict name: ``model.layers.3.mlp.up_proj.weight``) is
        placed. Scanned, that is its layer's slice of the stacked tensor: the same spec without the
        (unsharded) layer dim."""
        if name in self.placements:
            return self.placements[name]
        stacked = scan.stacked_name(self.model, name) if self.scan_layers else None
        if stacked not in self.placements:
            raise KeyError(name)
        return scan.layer_placement(self.placements[stacked], name)

    def weight(self, name: str) -> jax.Array:
        """The weight ``name`` on the mesh; scanned, its layer's slice of the stacked tensor, placed
        as ``placement(name)`` says."""
        if name in self.weights:
            return self.weights[name]
        p = self.placement(name)
        stacked, layer = scan.stacked_slot(self.model, name)
        return jax.jit(lambda w: w[layer], out_shardings=NamedSharding(self.mesh, p.spec))(self.weights[stacked])

    # -- forward --------------------------------------------------------------------------------
    def logits_fn(self, weights, input_ids):
        logits, _ = self.fn(weights, (input_ids,), {})
        return logits

    def forward_jit(self, batch: int):
        """jit of the full-sequence forward: inputs sharded by the scheme's batch axes."""
        if batch not in self._forward:
            self._forward[batch] = jax.jit(
                self.logits_fn,
                in_shardings=(sharding.shardings_of(self.placements, self.mesh), self.input_sharding(batch)),
            )
        return self._forward[batch]

    def put_input(self, ids) -> jax.Array:
        ids = np.asarray(ids, dtype=np.int32)
        return sharding.put_global(ids, self.input_sharding(ids.shape[0], ids.ndim))

    def forward(self, input_ids) -> jax.Array:
        ids = self.put_input(input_ids)
        return self.forward_jit(ids.shape[0])(self.weights, ids)

    def timed_forward(self, input_ids) -> tuple[jax.Array, float, float]:
        """(logits, first call seconds incl. compile, warm call seconds)."""
        ids = self.put_input(input_ids)
        f = self.forward_jit(ids.shape[0])
        t0 = time.perf_counter()
        f(self.weights, ids).block_until_ready()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = f(self.weights, ids).block_until_ready()
        return out, first, time.perf_counter() - t0

    def compiled_forward(self, input_ids):
        """The compiled program of one forward (for collectives and memory analysis)."""
        ids = self.put_input(input_ids)
        return self.forward_jit(ids.shape[0]).lower(self.weights, ids).compile()


def lift(
    model: torch.nn.Module,
    mesh: Mesh,
    scheme="tp",
    *,
    fallback: str = "error",
    scan_layers: bool | None = None,
    stored=None,
) -> LiftedModule:
    """Lifts ``model`` with torchax and places its weights on ``mesh`` by a rule table: a
    ``sharding.Scheme``, a built-in scheme name or rules file, or a list of ``(regex, spec)`` rows.

    Any ``nn.Module`` gives a ``LiftedModule``. A causal LM (``CausalLMContract``: our model_torch
    families, transformers models through the adapter) gives a ``Lifted``, with what the model
    states about itself applied on top: its own tensor-parallel plan and head layout, fused
    projections split, kv heads repeated for a wide head axis, activations pinned for fsdp.
    Every placement is validated before anything is put on a device.

    ``scan_layers``: the decoder stack runs as one ``jax.lax.scan`` over weights stacked on a
    leading layer dim (``bridge.scan``), so it compiles one layer, not all. None (default): scanned
    whenever the model can be (model_torch families); False unrolls every layer.

    ``stored``: a ``checkpoints.StoredWeights`` to read the weights from instead of the module's
    own tensors (the module may then live on the meta device): each device's slice is read
    straight into place, so no full host copy of the model is ever made.
    """
    scan_layers = scan.scans(model, scan_layers)
    plan = weight_plan.plan_weights(model, dict(mesh.shape), scheme, fallback=fallback, scan_layers=scan_layers)
    weight_plan.check_fits(plan, mesh)
    if stored is None:
        weights, fn = extract(model)
        placed = weight_plan.place_weights(plan, weights, mesh)
        del weights
    else:
        names, fn = extract_fn(model)
        stored.check(model, names)
        placed = weight_plan.load_weights(plan, stored.read, mesh, stored.label)
    lifted = lifted_from_plan(model, fn, placed, mesh, plan)
    lifted.stored = stored  # a model on the meta device is lifted again (other meshes) from its source
    return lifted


def lifted_from_plan(model, fn, weights: dict, mesh: Mesh, plan: weight_plan.WeightPlan) -> LiftedModule:
    """The ``LiftedModule`` (a ``Lifted`` for a causal LM) of ``model``'s extracted ``fn`` and
    ``weights`` placed by ``plan`` (real arrays, or ``ShapeDtypeStruct``s for an abstract plan)."""
    if not is_causal_lm(model):
        if plan.scan_layers:
            fn = scan.scanned_module_fn(fn, model)
        return LiftedModule(model, fn, weights, mesh, plan.scheme, plan.placements, plan)
    if plan.scan_layers:  # the model's own calls of its stack, scanned
        fn = scan.scanned_module_fn(fn, model)
    return Lifted(model, lifted_fn(fn, model, mesh, plan.scheme, plan.placements, plan.kv_head_copies), weights, mesh,
                  plan.scheme, plan.placements, kv_head_copies=plan.kv_head_copies, scan_layers=plan.scan_layers,
                  plan=plan)  # fmt: skip


def lifted_fn(fn, model, mesh: Mesh, scheme: sharding.Scheme, placements, copies: int = 1):
    """The extracted ``fn`` as every ``Lifted`` runs it: traced with kv heads repeated (when they
    are), activations pinned (when the scheme asks), logits cut back to the true vocab (when it
    was padded), and the lowerings told the mesh's size (``lowerings.on_mesh``)."""
    from bridge import cpu_kernels, lowerings

    traced = fn

    def fn(weights, args, kwargs=None):
        with lowerings.on_mesh(mesh.size), cpu_kernels.placed(mesh, kernel_placement(mesh, scheme, placements, weights)):
            return traced(weights, args, kwargs)

    if copies > 1:
        inner = fn

        def fn(weights, args, kwargs=None):
            with model.repeated_kv_heads(copies):
                return inner(weights, args, kwargs)

    return cut_padded_vocab(constrain(fn, model, mesh, scheme), model, placements)


def kernel_placement(mesh: Mesh, scheme: sharding.Scheme, placements, weights):
    """Where the weights traced as ``weights`` and the KV cache live, for the CPU kernels on a mesh:
    the weight plan's specs and the cache's layout (``kv_cache.spec``)."""
    from bridge import cpu_kernels, kv_cache

    return cpu_kernels.Placement(
        mesh=mesh,
        weights={id(w): (w, placements[k].spec) for k, w in weights.items() if k in placements},
        batch_axes=lambda n: (tuple(sharding.batch_spec(scheme, mesh, n, 1)) or (None,))[0],
        cache_spec=lambda batch, heads, stacked: kv_cache.spec(scheme, mesh, batch, heads, stacked),
    )


def lift_checkpoint(
    path,
    mesh: Mesh,
    scheme: sharding.Scheme | str = "tp",
    *,
    dtype: str = "float32",
    fallback: str = "error",
    scan_layers: bool | None = None,
) -> Lifted:
    """Loads a HF checkpoint directory of a model_torch family straight onto the mesh: the model
    is built on the meta device (no memory), every placement is validated first, then each
    device's slice of each tensor is read from the safetensors files into place
    (``lift(..., stored=...)``)."""
    from pathlib import Path

    from bridge import checkpoints

    model, stored, _ = checkpoints.open_stored("dir", Path(path), dtype)
    return lift(model, mesh, scheme, fallback=fallback, scan_layers=scan_layers, stored=stored)
