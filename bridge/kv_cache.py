"""The KV cache's one home on the bridge side (gpt-fast keeps one ``KVCache`` module; here the model
states its cache and the bridge decides the rest):

  * the model's part (``model_torch.contract``): ``init_kv_cache`` gives per-layer (keys, values)
    of ``[batch, kv_heads, max_seq, head_dim]`` (a sparse-attention layer adds its indexer's keys,
    ``[batch, max_seq, dim]``, moving with the same columns), or a ``StateCache`` for a recurrent
    or linear-attention layer (its states, ``[batch, ...]``), which ``forward`` takes and returns updated;
  * layout: per layer, or for a scanned stack one (keys, values) pair with a leading layer dim
    (``model_torch.contract.STACKED_KV_RANK``), written in place by the scan (``scan.StackCalls``);
  * placement: batch like the inputs, kv heads on the scheme's head axis, repeated as the weight plan
    repeats the kv heads of the weights; the layer dim unsharded; a state split by batch only;
  * allocation: zeros on the mesh inside jit (no host copy), and a fresh copy to rerun a donating step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sharding
from bridge.extract import jax_dtype
from model_torch.contract import StateCache

# The compile cache stores programs (``jax.export``) whose arguments and results hold state caches.
jax.export.register_namedtuple_serialization(StateCache, serialized_name="torchax_bridge.StateCache")


def spec(scheme: sharding.Scheme, mesh: Mesh, batch: int, kv_heads: int, stacked: bool = False) -> P:
    """``[batch, kv_heads, seq, head_dim]`` (``stacked``: a leading layer dim): batch like the
    inputs, kv heads on the head axis when they divide it (else replicated: each device then holds
    every kv head)."""
    b = sharding.batch_spec(scheme, mesh, batch, 1)
    b = b[0] if len(b) else None
    h = scheme.head_axis
    if h is None or h not in mesh.shape or kv_heads % mesh.shape[h]:
        h = None
    return P(None, b, h, None, None) if stacked else P(b, h, None, None)


def kv_heads(lifted) -> int:
    """The kv heads the cache holds: the model's, times the copies the weight plan made."""
    return lifted.model.kv_cache_heads * lifted.kv_head_copies


def placement(lifted, batch: int) -> NamedSharding:
    return NamedSharding(lifted.mesh, spec(lifted.scheme, lifted.mesh, batch, kv_heads(lifted), lifted.scan_layers))


def layout(lifted, batch: int, seq: int) -> list:
    """The cache as ``ShapeDtypeStruct``s with their shardings: shapes from the model's own
    ``init_kv_cache`` (built on the meta device: no memory), kv heads repeated as the plan says. A
    layer's recurrent state (``StateCache``: no sequence dim) is split by batch like the inputs and
    whole on every other axis."""
    shard = placement(lifted, batch)
    copies = lifted.kv_head_copies
    layers = lifted.model.init_kv_cache(batch, seq, device="meta")
    lead = (len(layers),) if lifted.scan_layers else ()
    b = sharding.batch_spec(lifted.scheme, lifted.mesh, batch, 1)

    def kv(t):
        if t.ndim == 3:  # a sparse-attention indexer's keys [batch, max_seq, dim]: one head, whole
            return state(t)
        return jax.ShapeDtypeStruct((*lead, t.shape[0], t.shape[1] * copies, *t.shape[2:]), jax_dtype(t.dtype), sharding=shard)

    def state(t):
        return jax.ShapeDtypeStruct(t.shape, jax_dtype(t.dtype), sharding=NamedSharding(lifted.mesh, P(*b, *[None] * (t.ndim - len(b)))))

    out = map_layers(kv, state, layers)
    return out[:1] if lifted.scan_layers else out


def map_layers(kv, state, cache: list, *others: list) -> list:
    """The cache with ``kv(leaf, *other_leaves)`` applied to each key/value tensor and ``state(...)``
    to each recurrent state (``others``: caches of the same structure, their leaves passed along):
    what moves with the cache's columns, and what is one row's state with no columns."""

    def layer(entry, *more):
        if isinstance(entry, StateCache):
            return StateCache(*(tuple(map(state, part, *(m[i] for m in more))) for i, part in enumerate(entry[:2])),
                              tuple(map(kv, entry.kv, *(m.kv for m in more))))  # fmt: skip
        return tuple(map(kv, entry, *more))

    return [layer(entry, *more) for entry, *more in zip(cache, *others)]


def beyond_pairs(model) -> str | None:
    """What some layer of a causal LM keeps beyond one (keys, values) pair, or None: a recurrent
    state (``StateCache``: Mamba, linear attention), a sparse-attention indexer's keys, or a cache
    for each of several attentions (LongCat-Flash's two per layer)."""
    if model.recompute_reason:
        return "its token history (it decodes by recomputing)"
    layers = model.init_kv_cache(1, 1, device="meta") if model.HAS_KV_CACHE else []
    if any(isinstance(layer, StateCache) for layer in layers):
        return "a recurrent state (Mamba-style)"
    depth = len(model.decoder_layers())
    if layers and len(layers) != depth:
        return f"{len(layers)} caches for {depth} layers (several attentions in a layer)"
    if any(len(layer) > 2 for layer in layers):
        return "a sparse-attention indexer's keys"
    return None


def empty(lifted, batch: int, seq: int) -> list:
    """Zeros of the cache layout, placed on the mesh. Usable inside jit (then no host copy exists)."""
    return jax.tree.map(lambda s: jax.lax.with_sharding_constraint(jnp.zeros(s.shape, s.dtype), s.sharding),
                        layout(lifted, batch, seq))  # fmt: skip


def bytes_per_device(lifted, batch: int, seq: int) -> int:
    return sum(math.prod(s.sharding.shard_shape(s.shape)) * jnp.dtype(s.dtype).itemsize
               for s in jax.tree.leaves(layout(lifted, batch, seq)))  # fmt: skip


def check_fits(lifted, batch: int, seq: int) -> None:
    """Refuses, before compiling, a request whose KV cache cannot fit beside the placed weights."""
    from bridge.errors import DoesNotFit
    from bridge.devices import device_memory

    memory = device_memory(lifted.mesh)
    if memory is None:
        return
    have, sharing, where = memory
    need = bytes_per_device(lifted, batch, seq) * sharing
    if need > have:
        raise DoesNotFit(f"a KV cache for {batch} row(s) x {seq} positions needs {need / 2**30:.1f} GiB but, beside the "
                         f"weights, {where}; use fewer rows or a shorter prompt / --max-new-tokens, or --quantize int8")  # fmt: skip
