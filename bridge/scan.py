"""The decoder stack as one ``jax.lax.scan`` over weights stacked on a leading layer dimension, so a
model compiles one layer instead of every layer (MaxText's ``scan_layers``).

The model needs no cooperation (``StackCalls``): while the lifted function is traced, the bridge
finds its stack of identical layers, records the module's own calls of them, and runs the first
layer's torch forward as the body of a scan over the stacked weights and the stacked KV cache
(through torchax, with that layer's parameters swapped for the current slice). The cache a layer
writes is found among its arguments: transformers' ``Cache`` or model_torch's ``LayerCaches``.

Names: every per-layer tensor ``model.layers.<i>.<rest>`` becomes one tensor ``model.layers.*.<rest>``
of shape ``[num_layers, ...]``. Sharding rules are resolved on layer 0's name and shape, and the
layer dim is never sharded, so one table serves both layouts.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import weakref

import jax
import jax.numpy as jnp
import numpy as np

import sharding
from bridge import cpu_kernels
from model_torch.contract import LayerCaches, is_stacked


def layer_prefix(model) -> str:
    return stack_path(model) + "."


def stack_path(model) -> str:
    """The dotted path of the layer stack a scan runs: a causal LM's decoder layers
    (``DECODER_LAYERS``), else the longest ``ModuleList`` or ``Sequential`` of at least two
    identical layers (``identical_stack``); '' when there is none."""
    path = getattr(model, "DECODER_LAYERS", None)
    return path if path is not None else identical_stack(model)


def _layout(module) -> tuple:
    """What a scan body needs every layer to share: its tensors' names, shapes and dtypes, and every
    submodule's class and settings (a stride, an activation, a flag: ResNet's two conv layers of a
    block hold the same tensors, and only the first applies its ReLU). A layer's own index
    (``layer_idx``, for a cache) may differ."""
    import torch

    def same(v):  # a function by its code (a lambda made per module is the same code each time)
        return repr(v.__code__) if hasattr(v, "__code__") else repr(v)

    def settings(m):
        return tuple(sorted((k, same(v)) for k, v in vars(m).items()
                            if not k.startswith("_") and k not in ("training", "forward") and "layer_id" not in k
                            and not isinstance(v, (torch.Tensor, torch.nn.Module))))  # fmt: skip

    return (tuple((k, tuple(t.shape), t.dtype) for k, t in module.state_dict(keep_vars=True).items()),
            tuple((name, type(m), settings(m)) for name, m in module.named_modules()))  # fmt: skip


def _one_stack(layers) -> bool:
    """Whether ``layers`` can run as one scan body: the same ``_layout`` each, and each layer its own
    tensors (ALBERT-style sharing runs one module many times: unrolled)."""
    tensors = [id(t) for layer in layers for t in layer.state_dict(keep_vars=True).values()]
    return len({_layout(layer) for layer in layers}) == 1 and len(set(tensors)) == len(tensors)


_stacks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (its modules' ids, path)


def identical_stack(model) -> str:
    """The path of ``model``'s longest ``ModuleList``/``Sequential`` whose entries (at least two) are
    of one class and hold the same tensors: the stack a scan can run with one layer's forward as its
    body (a transformer's blocks, BERT's layers). '' when there is none. Remembered per model while
    its module tree stays the same (names are mapped through it once per weight while planning)."""
    from torch import nn

    tree = tuple(id(m) for m in model.modules())
    known = _stacks.get(model)
    if known is not None and known[0] == tree:
        return known[1]
    best, size = "", 1
    for name, m in model.named_modules():
        if name and isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > size:
            if any(True for _ in m[0].parameters()) and _one_stack(m):
                best, size = name, len(m)
    _stacks[model] = (tree, best)
    return best


def stacked_slot(model, name: str) -> tuple[str, int] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> (``model.layers.*.mlp.up_proj.weight``, 3): the
    stacked tensor a per-layer tensor lives in and its layer (None outside the decoder stack)."""
    m = re.match(re.escape(layer_prefix(model)) + r"(\d+)\.(.+)$", name)
    return (f"{layer_prefix(model)}*.{m.group(2)}", int(m.group(1))) if m else None


def stacked_name(model, name: str) -> str | None:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight`` (None for a
    tensor outside the decoder stack)."""
    slot = stacked_slot(model, name)
    return slot[0] if slot else None


def layer0_name(name: str) -> str:
    """``model.layers.*.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj.weight`` (any other name
    as it is): the per-layer name rules, parameters and checkpoints know a stacked tensor by."""
    return name.replace("*.", "0.", 1)


def why_not_scanned(model) -> str | None:
    """Why ``model``'s layer stack cannot run as one scan, or None when it can. A module that is not
    a causal LM scans its ``identical_stack``, a causal LM (ours or transformers') its decoder
    layers when those are one stack (``scanned_module_fn``)."""
    from model_torch.contract import CausalLMContract

    if not isinstance(model, CausalLMContract):
        if not identical_stack(model):
            return (f"{type(model).__name__} has no ModuleList or Sequential of two or more identical layers (same "
                    f"class and tensors) to scan")  # fmt: skip
        return None
    if not _one_stack([layer for _, layer in model.decoder_layers()]):
        return (f"{type(model).__name__}'s decoder layers differ (their tensors or settings, e.g. sliding and "
                f"global attention layers); one scan runs one body")  # fmt: skip
    from bridge import kv_cache

    if beyond := kv_cache.beyond_pairs(model):
        return (f"{type(model).__name__}'s layers keep {beyond}, which the scan's stacked cache does not "
                f"hold; its layers run unrolled")  # fmt: skip
    return None


def scans(model, scan_layers: bool | None = None) -> bool:
    """Whether ``model``'s decoder stack runs scanned. ``None``, the default everywhere: scanned
    whenever it can be (``why_not_scanned``; bf16/f16 models on CPU excepted, see
    ``_slow_16_bit_slices``, and GPUs, see ``_slow_gpu_slices``), since it compiles one layer
    instead of all and runs as fast as unrolled (SmolLM2 fp32 on 1 device: decode 96-101%, prefill
    100-109% of unrolled's time in alternating rounds; compile 7.59 -> 2.17 s). ``True`` on a model that cannot scan is an error.
    ``plan`` takes the same default, so it reports the program ``generate`` runs here."""
    if scan_layers is False:
        return False
    problem = why_not_scanned(model)
    if scan_layers is None:
        return problem is None and not (_slow_16_bit_slices(model) or _slow_gpu_slices())
    if scan_layers and problem:
        from bridge.errors import UsageError

        raise UsageError(problem)
    return True


def _slow_gpu_slices() -> bool:
    """On a GPU the scanned stack decodes at half the unrolled speed: each step copies its layer's
    slice out of the stacked weights before using it, so the weights cross HBM more than once.
    Llama-3-8B widths on an NVIDIA H200 (jax 0.11.2, benchmarks/results/decode_llama-3-8b_32l_*):
    bf16 batch 1 72 tokens/s scanned against 145 unrolled (33% and 66% of the copy roofline),
    batch 8 616 against 1428, int8 115 against 198; unrolled compiles in 13-19 s instead of 6. TPUs
    (unmeasured here) keep the scan, as MaxText does."""
    return jax.default_backend() == "gpu"


def _slow_16_bit_slices(model) -> bool:
    """XLA:CPU does not dynamic-slice bf16/f16 tensors itself: it converts the whole stacked tensor
    to f32, slices that, and hoists the conversion out of the scan, so every step makes f32 copies
    of all weights and of the KV cache (SmolLM2 bf16 decode: 19-23 tokens/s scanned against 62-72
    unrolled). The CPU kernels' layer copy slices them instead (``cpu_kernels.copies_layers``), so a
    16-bit model scans where the kernels build: SmolLM2 bf16 batch 1 103 against 95 tokens/s
    unrolled, batch 8 459 against 383, compile 2 s instead of 8-9; Llama-3-8B bf16 prefill-512
    temporaries 0.49 GiB instead of 27, compile 4.7 s, peak RSS 1.08x its weights as unrolled;
    Llama-3-8B int8: load 123 s instead of 198, decode 3.71 tok/s instead of 2.75 (avx512f). Without
    the kernels (no compiler, switched off) a 16-bit model on CPU runs unrolled."""
    from bridge import cpu_kernels

    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    sixteen = jax.default_backend() == "cpu" and bool(floats) and all(dt.itemsize == 2 for dt in floats)
    return sixteen and not cpu_kernels.available()


def stack_layout(model, shapes: dict) -> tuple[dict, dict[str, list[str]]]:
    """(name -> (shape, dtype) of the stacked layout, stacked name -> its per-layer names in layer
    order) for per-layer ``shapes``. Every layer must hold the same tensors with the same shapes (a
    scan runs one body)."""
    from bridge.errors import UsageError

    n = len(model.get_submodule(stack_path(model)))
    layout, layers = {}, {}
    for name, (shape, dtype) in shapes.items():
        s = stacked_name(model, name)
        if s is None:
            layout[name] = (tuple(shape), dtype)
        else:
            layers.setdefault(s, []).append(name)
    for s, names in layers.items():
        names.sort(key=lambda k: stacked_slot(model, k)[1])
        found = {tuple(shapes[k][0]) for k in names}
        if len(names) != n or len(found) != 1:
            raise UsageError(f"{s}: the decoder layers differ ({len(names)} of {n} layers hold it, shapes "
                             f"{sorted(found)}); this model cannot run as a scanned stack")  # fmt: skip
        layout[s] = ((n, *found.pop()), shapes[names[0]][1])
    return layout, layers


def layer_placement(stacked, name: str | None = None):
    """One layer's slice of a stacked tensor's placement: the (unsharded) layer dim dropped."""
    import dataclasses

    from jax.sharding import PartitionSpec as P

    return dataclasses.replace(stacked, name=name or layer0_name(stacked.name), shape=tuple(stacked.shape[1:]),
                               spec=P(*stacked.spec[1:]))  # fmt: skip


def per_layer_views(model, weights: dict) -> dict:
    """The full per-layer dict the extracted torch function expects, each layer's tensor a slice of
    its stacked tensor (the runner reads the stacked tensors themselves; the slices go unused and
    XLA drops them)."""
    out = {}
    for name, w in weights.items():
        if "*." in name:
            for i in range(w.shape[0]):
                out[name.replace("*.", f"{i}.", 1)] = w[i]
        else:
            out[name] = w
    return out


def layer_name(model, name: str, i: int) -> str:
    """A layer-0 module or tensor name as layer ``i``'s (``model.layers.0.mlp`` -> ``model.layers.3.mlp``);
    any other name as it is."""
    zero = layer_prefix(model) + "0"
    if name == zero or name.startswith(zero + "."):
        return layer_prefix(model) + str(i) + name[len(zero) :]
    return name


# What the scan body hands out per iteration besides its carry: set by ``per_iteration_outputs``.
_iteration_sink = None


@contextlib.contextmanager
def per_iteration_outputs(sink):
    """While a scanned stack is traced, values recorded during the body (by forward hooks on the
    first layer's modules, say) come out stacked per layer instead of staying inside the loop.

    ``sink`` keeps the recording: ``sink.mark()`` is called before the body runs; ``sink.take(mark)``
    removes the body's records since then and returns their values (a pytree of arrays traced in
    the body); after the scan ``sink.spread(stacked, num_layers)`` gets those values with each leaf
    stacked ``[num_layers, ...]``, to put back in order, one layer after another. This
    is how ``bridge.check`` compares every layer of a scanned stack, not just the body."""
    global _iteration_sink
    previous, _iteration_sink = _iteration_sink, sink
    try:
        yield
    finally:
        _iteration_sink = previous


def sliced_in_body(rows: int, stacked: dict) -> tuple[bool, bool]:
    """(each layer's weights and cache are sliced in the scan's body by index, the CPU kernels read
    them from the stack in place) for a call of ``rows`` token rows over ``stacked`` weights. In
    place: scan's own slicing of ``xs`` would hand the kernels a copy of every layer's weights on
    every step. By index also where ``cpu_kernels.copies_layers``: XLA:CPU slices a 16-bit stack
    by converting all of it to f32 (see there)."""
    in_place = cpu_kernels.active() and (cpu_kernels.takes_rows(rows) or rows == 1 and any(
        w.ndim == 3 and (w.shape[-1] >= cpu_kernels.ONE_ROW_MIN_K or cpu_kernels.copies_layers(w))
        for w in stacked.values()))  # fmt: skip
    return in_place or any(cpu_kernels.copies_layers(w) for w in stacked.values()), in_place


def unstack_weights(weights: dict) -> dict:
    """The per-layer layout of stacked weights (host arrays), e.g. to save a checkpoint."""
    out = {}
    for name, w in weights.items():
        if "*." in name:
            w = np.asarray(sharding.to_host(w))
            for i in range(w.shape[0]):
                out[name.replace("*.", f"{i}.", 1)] = w[i]
        else:
            out[name] = w
    return out


# ---------------------------------------------------------------------------------------------------
# Any module's stack of identical layers, scanned (no cooperation from the module)
# ---------------------------------------------------------------------------------------------------
_ARRAY = object()  # marks where a layer's output holds an array (its other leaves are static: None, ...)


class NotScannable(Exception):
    """The stack was not called as one chain of identical calls; it runs unrolled instead."""


def _same(a, b) -> bool:
    """Two calls' other arguments are the same: tensors the same objects, anything else equal."""
    import torch
    from torch.utils import _pytree as torch_pytree

    la, ta = torch_pytree.tree_flatten(a)
    lb, tb = torch_pytree.tree_flatten(b)
    if ta != tb:
        return False
    return all(x is y if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) else x == y for x, y in zip(la, lb))


class StackCalls:
    """While the lifted function is traced, the stack's layers are called as the module calls them,
    one after another; each call is recorded and answered with a placeholder tensor, and the last one
    runs them all as one ``jax.lax.scan`` with layer 0's own forward as the body (its parameters
    swapped for each layer's slice of the stacked weights), then gives every placeholder its layer's
    output. It needs each layer's input to be the previous layer's output, and every other argument
    to be the same for all layers; a placeholder used before the last layer is an error
    (``NotScannable``), after which the stack runs unrolled."""

    def __init__(self, model, stacked: dict):
        from bridge.extract import torchax_with_lowerings

        self.env = torchax_with_lowerings().default_env()
        self.layers = model.get_submodule(stack_path(model))
        prefix = layer_prefix(model) + "*."
        self.params = {k[len(prefix):]: v for k, v in stacked.items() if k.startswith(prefix)}
        self.calls: list = []
        self.pending: list = []  # placeholders not yet given their values
        self.placeholders: list = []  # per call before the last: its output's leaves
        self.chained = None  # the placeholder the next layer must be called with

    def __enter__(self):
        import collections

        self.saved = []
        for i, layer in enumerate(self.layers):
            # The outer calls fire no hooks: layer 0's run inside the scan body, once per layer.
            # A forward set on the instance (training's ``remat_layers``) is the one the body runs.
            self.saved.append((layer._forward_hooks, layer._forward_pre_hooks, layer.__dict__.get("forward")))
            layer._forward_hooks, layer._forward_pre_hooks = collections.OrderedDict(), collections.OrderedDict()
            layer.forward = lambda *a, _i=i, **k: self.call(_i, a, k)
        return self

    def __exit__(self, *exc):
        for layer, saved in zip(self.layers, self.saved):
            self._own_forward(layer, saved)
            layer._forward_hooks, layer._forward_pre_hooks = saved[:2]
        return False

    @staticmethod
    def _own_forward(layer, saved):
        """``layer``'s forward as it was before the stack was recorded."""
        if saved[2] is None:
            del layer.forward
        else:
            layer.forward = saved[2]

    def placeholder(self, struct):
        from torchax.tensor import Tensor

        # Its value is a shape, not an array: any op on it before the scan has run fails.
        p = Tensor(jax.ShapeDtypeStruct(struct.shape, struct.dtype), self.env)
        self.pending.append(p)
        return p

    def call(self, i: int, args: tuple, kwargs: dict):
        import torch
        from torch.utils import _pytree as torch_pytree

        if not args or not isinstance(args[0], torch.Tensor):
            raise NotScannable("a layer's first argument is not its input tensor")
        if i != len(self.calls):
            raise NotScannable(f"layer {i} was called out of order")
        if i and (args[0] is not self.chained or not _same((args[1:], kwargs), self.calls[0][1:])):
            raise NotScannable(f"layer {i} did not get layer {i - 1}'s output and the same other arguments")
        self.calls.append((args[0], args[1:], kwargs))
        if i == len(self.layers) - 1:
            return self.run()
        if i == 0:  # what a layer returns (a tensor, a tuple with the hidden state first, ...)
            self.structure = self.abstract_output()
        leaves = [self.placeholder(x) if isinstance(x, jax.ShapeDtypeStruct) else x for x in self.structure[0]]
        self.chained = leaves[0]
        self.placeholders.append(leaves)
        return torch_pytree.tree_unflatten(leaves, self.structure[1])

    def layer(self, p, kv, h, sink=None, carried=None):
        """Layer 0's own forward with weights ``p`` and cache slice ``kv`` (jax) on hidden ``h``:
        (its output's leaves, their tree, this call's cache columns, the hooks' records).
        ``carried``: {"k", "v": the stacked cache, "i": this layer} instead of ``kv``: the layer's
        cache update writes its new columns straight into the stacked cache (updated in ``carried``)
        and its attention reads its layer of that in place."""
        import collections

        import torch
        from torch.nn.utils.stateless import _reparametrize_module
        from torch.utils import _pytree as torch_pytree

        env, first, cache = self.env, self.layers[0], self.cache
        x, rest, kwargs = self.calls[0]
        hooks, pre, _ = self.saved[0]
        p_t, h_t = env.j2t_iso((p, h))
        written = {}  # model_torch's cache: this call's columns, and where they go
        if isinstance(cache, LayerCaches):

            def update(layer, key_states, value_states, cache_position):
                # Whatever ``layer`` the call names, the body's layer is the scan's (or carried["i"]).
                new = env.t2j_iso((key_states, value_states))
                written["position"] = cache_position
                start = env.t2j_iso(cache_position).reshape(-1)[0]
                if carried is not None:
                    return self.write_carried(carried, new, start)
                written["columns"] = tuple(a.astype(c.dtype) for a, c in zip(new, kv))
                return env.j2t_iso(tuple(cpu_kernels.bitwise_update_slice(c, a, (0, 0, start, 0))
                                         for c, a in zip(kv, written["columns"])))  # fmt: skip

            cache.update = update
        elif cache is not None:  # this layer's cache as the transformers cache's one layer
            outer = cache.layers[0]
            view = copy.copy(outer)
            if carried is not None:
                kv = tuple(cpu_kernels.layer_slice(carried[n], carried["i"], kv_cache=True) for n in ("k", "v"))

                def update(key_states, value_states, *args, **kw):
                    return self.write_carried(carried, env.t2j_iso((key_states, value_states)), self.start)

                view.update = update
            view.keys, view.values = env.j2t_iso(kv)
            view.cumulative_length = env.j2t_iso(self.start) + 0  # update() advances it in place
            cache.layers[0] = view
        mark = sink.mark() if sink is not None else None
        first._forward_hooks, first._forward_pre_hooks = hooks, pre
        self._own_forward(first, self.saved[0])
        try:
            with _reparametrize_module(first, p_t):
                out = first(h_t, *rest, **kwargs)
        finally:
            first.forward = lambda *a, **k: self.call(0, a, k)
            first._forward_hooks, first._forward_pre_hooks = collections.OrderedDict(), collections.OrderedDict()
            if isinstance(cache, LayerCaches):
                del cache.update
            elif cache is not None:
                cache.layers[0] = outer
        leaves, tree = torch_pytree.tree_flatten(out)
        if not leaves or not isinstance(leaves[0], torch.Tensor) or tuple(leaves[0].shape) != tuple(h_t.shape):
            raise NotScannable("a layer's output does not start with a tensor shaped like its input")
        records = sink.take(mark) if sink is not None else None
        columns = None
        if isinstance(cache, LayerCaches) and carried is None:
            columns = written["columns"]
            self.position = written["position"]
        elif cache is not None and carried is None:
            # Only this call's columns leave the scan, to be written into the stacked cache in place
            # after it: a layer returns its whole updated cache, and stacking those as the scan's
            # output copied the whole cache every step (SmolLM2 fp32, batch 8: 78.8 tokens/s scanned
            # against 108.2 unrolled at 128 new tokens).
            columns = tuple(jax.lax.dynamic_slice_in_dim(a, self.start, self.new, axis=2)
                            for a in env.t2j_iso((view.keys, view.values)))  # fmt: skip
        return [env.t2j_iso(v) if isinstance(v, torch.Tensor) else v for v in leaves], tree, columns, records

    def write_carried(self, carried: dict, new: tuple, start) -> tuple:
        """A layer's new keys/values (jax) written at column ``start`` of its layer (``carried["i"]``)
        in the stacked cache the scan carries (``carried["k"]``, ``["v"]``, updated), in place; its
        layer's (keys, values) returned as slices of the stack that the kernels read in place."""
        for n, a in zip(("k", "v"), new):
            at = (carried["i"], 0, 0, start, 0)
            carried[n] = cpu_kernels.bitwise_update_slice(carried[n], a[None].astype(carried[n].dtype), at)
        return self.env.j2t_iso(tuple(cpu_kernels.layer_slice(carried[n], carried["i"], kv_cache=True)
                                      for n in ("k", "v")))  # fmt: skip

    def set_cache(self, k, v):
        """The stacked cache after the scan, back in the module's cache object."""
        if isinstance(self.cache, LayerCaches):
            self.cache.layers[0] = self.env.j2t_iso((k, v))
        else:
            self.cache.layers[0].keys, self.cache.layers[0].values = self.env.j2t_iso((k, v))

    def prepare(self):
        x, rest, kwargs = self.calls[0]
        self.cache = stacked_cache((rest, kwargs))
        self.new = x.shape[-2]  # the positions this call writes into the cache
        if isinstance(self.cache, LayerCaches):  # the start is read from the cache write's position
            self.stacked_kv, self.start = tuple(self.env.t2j_iso(tuple(self.cache.layers[0]))), None
            return
        self.stacked_kv = None if self.cache is None else tuple(
            self.env.t2j_iso((self.cache.layers[0].keys, self.cache.layers[0].values)))  # fmt: skip
        self.start = None if self.cache is None else self.env.t2j_iso(self.cache.layers[0].cumulative_length)

    def abstract_output(self):
        """(leaves as ShapeDtypeStructs or static values, tree) of one layer's output, from an
        abstract trace of layer 0's forward (nothing computed)."""
        self.prepare()
        x = self.calls[0][0]
        found = {}

        def one(p, kv, h):
            # the sink's records of this trace are taken and dropped: they are the abstract trace's
            leaves, found["tree"], _, _ = self.layer(p, kv, h, _iteration_sink)
            found["static"] = [_ARRAY if isinstance(v, jax.Array) else v for v in leaves]
            return [v for v in leaves if isinstance(v, jax.Array)]

        layer0 = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)  # noqa: E731
        arrays = jax.eval_shape(one, jax.tree.map(layer0, self.params),
                                None if self.stacked_kv is None else jax.tree.map(layer0, self.stacked_kv),
                                jax.ShapeDtypeStruct(tuple(x.shape), self.env.t2j_iso(x).dtype))  # fmt: skip
        it = iter(arrays)
        return [next(it) if v is _ARRAY else v for v in found["static"]], found["tree"]

    def run(self):
        from torch.utils import _pytree as torch_pytree

        env = self.env
        x = self.calls[0][0]
        sink = _iteration_sink
        self.prepare()
        stacked_kv = self.stacked_kv
        by_index, in_place = sliced_in_body(math.prod(x.shape[:-1]), self.params)
        xs = (jnp.arange(len(self.layers)), None) if by_index else (self.params, stacked_kv)
        found = {}

        def split(leaves):  # the output's arrays; its static leaves (None, ...) kept in ``found``
            found["static"] = [_ARRAY if isinstance(v, jax.Array) else v for v in leaves]
            return [v for v in leaves if isinstance(v, jax.Array)]

        def body(h, xs):
            p, kv = xs
            if by_index:
                kv = None if stacked_kv is None else tuple(cpu_kernels.layer_slice(c, p, kv_cache=True) for c in stacked_kv)
                p = {name: cpu_kernels.layer_slice(w, p) for name, w in self.params.items()}
            leaves, found["tree"], columns, records = self.layer(p, kv, h, sink)
            arrays = split(leaves)
            return arrays[0], (arrays, records, columns)

        def body_carrying_the_cache(carry, i):
            h, k, v = carry
            p = {name: cpu_kernels.layer_slice(w, i) for name, w in self.params.items()}
            carried = {"k": k, "v": v, "i": i}
            leaves, found["tree"], _, records = self.layer(p, None, h, sink, carried)
            arrays = split(leaves)
            return (arrays[0], carried["k"], carried["v"]), (arrays, records)

        with cpu_kernels.layer_slices():
            if in_place and stacked_kv is not None:
                # Decode with the kernels: the stacked cache is the scan's carry, each layer writes its
                # new columns into it in place and its attention reads its layer there, as the
                # rewrite's does (transformers' update wrote into a copy of the layer's slice:
                # SmolLM2 b8 at 0.79x of the rewrite).
                (h, k, v), (outs, records) = jax.lax.scan(body_carrying_the_cache, (env.t2j_iso(x), *stacked_kv),
                                                          jnp.arange(len(self.layers)))  # fmt: skip
                self.set_cache(k, v)
            else:
                h, (outs, records, columns) = jax.lax.scan(body, env.t2j_iso(x), xs)
        if sink is not None:
            sink.spread(records, len(self.layers))
        if self.cache is not None and not (in_place and stacked_kv is not None):  # new columns, in place
            start = self.start if self.start is not None else env.t2j_iso(self.position).reshape(-1)[0]
            self.set_cache(*(cpu_kernels.bitwise_update_slice(c, n.astype(c.dtype), (0, 0, 0, start, 0))
                             for c, n in zip(stacked_kv, columns)))  # fmt: skip
        pending = {id(p) for p in self.pending}
        for i, leaves in enumerate(self.placeholders):  # every layer's own outputs, as the module got them
            arrays = iter(outs)
            for p in leaves:
                if id(p) in pending:
                    p._elem = next(arrays)[i]
        self.pending, self.placeholders = [], []
        last = iter([h] + [o[-1] for o in outs[1:]])
        leaves = [env.j2t_iso(next(last)) if v is _ARRAY else v for v in found["static"]]
        return torch_pytree.tree_unflatten(leaves, found["tree"])


def stacked_cache(tree):
    """The cache among a layer call's arguments (model_torch's ``LayerCaches`` or transformers'
    ``Cache``), holding the stack's cache as one layer with a leading layer dim (``kv_cache.layout``
    of a scanned model); None when there is no cache. A per-layer cache cannot be scanned in place:
    ``NotScannable``."""
    import sys

    from torch.utils import _pytree as torch_pytree

    leaves = torch_pytree.tree_leaves(tree)
    ours = [x for x in leaves if isinstance(x, LayerCaches)]
    if ours:
        if not ours[0].stacked:
            raise NotScannable("the cache holds one tensor per layer, not the stacked cache a scan writes")
        return ours[0]
    if "transformers" not in sys.modules:
        return None
    from transformers.cache_utils import Cache

    caches = [x for x in leaves if isinstance(x, Cache)]
    if not caches:
        return None
    cache = caches[0]
    if len(cache.layers) != 1 or cache.layers[0].keys.ndim != 5:
        raise NotScannable("the transformers cache holds one tensor per layer, not the stacked cache a scan writes")
    return cache


def scanned_module_fn(fn, model):
    """``fn`` (a module's extracted function, per-layer names) taking the stacked weights of its
    ``identical_stack``: while it is traced the stack runs as one scan (``StackCalls``); where the
    module does not call it as one chain, the same weights run unrolled, and ``why`` says why."""

    def call(weights, args, kwargs=None):
        views = per_layer_views(model, weights)
        stack = StackCalls(model, {k: v for k, v in weights.items() if "*." in k})
        try:
            with stack:
                return fn(views, args, kwargs)
        except Exception as e:  # noqa: BLE001 - the scan could not hold this module's stack
            # Failing while placeholders were out: an op ran on one before the last layer.
            if not isinstance(e, NotScannable) and not stack.pending:
                raise
            if _holds_stacked_cache((args, kwargs)):
                from bridge.errors import UsageError

                raise UsageError(f"{type(model).__name__}'s layers cannot run as one scan ({e}); run it with "
                                 f"--no-scan-layers (scan_layers=False)") from None
            if not isinstance(e, NotScannable):
                e = NotScannable(f"a layer's output was used before the last layer ran ({type(e).__name__})")
            if call.why is None:
                import sys

                call.why = str(e).splitlines()[0]
                print(f"note: {type(model).__name__}'s {stack_path(model)} runs unrolled: {call.why}", file=sys.stderr)
            return fn(views, args, kwargs)

    call.why = None

    def training(weights, key, args, kwargs=None):
        # Train mode updates buffers in place, which a scan body cannot hand out: unrolled, and the
        # buffers of the stack stacked again.
        out, buffers = fn.training(per_layer_views(model, weights), key, args, kwargs)
        return out, restack(model, buffers, weights)

    if hasattr(fn, "training"):
        call.training = training
    return call


def _holds_stacked_cache(tree) -> bool:
    """A stacked KV cache among the lifted function's inputs: the unrolled layers cannot read it."""
    return any(is_stacked(x) for x in jax.tree.leaves(tree))


def restack(model, tensors: dict, like: dict) -> dict:
    """Per-layer ``tensors`` back in the stacked layout of ``like`` (names with ``*``)."""
    out = {k: v for k, v in tensors.items() if stacked_name(model, k) not in like}
    for name in like:
        if "*." in name:
            parts = [tensors.get(name.replace("*.", f"{i}.", 1)) for i in range(like[name].shape[0])]
            if all(p is not None for p in parts):
                out[name] = jnp.stack(parts)
    return out
