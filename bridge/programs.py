"""The programs every command runs over a lifted causal LM, written once: the prefill and the decode
step over the KV cache (``bridge.kv_cache``). Generation, ``compare --mode decode``, ``profile --mode decode``
and ``plan`` all call these, with concrete arrays or with abstract ``jax.ShapeDtypeStruct``s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bridge import cpu_kernels, kv_cache
from bridge.lift import Lifted


def prefill(lifted: Lifted, weights, ids, cache, positions=None, key_mask=None):
    """The prompts ``ids`` [B, T] written into cache columns 0..T-1 -> (last logits [B, V], cache)."""
    logits, cache = lifted.fn(
        weights,
        (ids,),
        dict(positions=positions, kv_cache=cache, cache_position=jnp.arange(ids.shape[1]), attention_mask=key_mask),
    )
    return logits[:, -1], cache


def decode_step(lifted: Lifted, weights, token, cache, column, positions=None, key_mask=None):
    """One token per row: ``token`` [B] written at cache ``column`` (a scalar), RoPE ``positions``
    [B] (default: the column), ``key_mask`` [B, S] -> (logits [B, V], new cache). On CPU devices
    the rows' matrix products and the attention over the cache use ``cpu_kernels`` (on a mesh of
    several devices, each on its own shards: ``lift.kernel_placement``)."""
    with cpu_kernels.used_on(lifted.mesh):
        logits, cache = lifted.fn(
            weights,
            (token[:, None],),
            dict(
                positions=None if positions is None else positions[:, None],
                kv_cache=cache,
                cache_position=column[None],
                attention_mask=key_mask,
            ),
        )
    return logits[:, -1], cache


def step_program(lifted: Lifted, mode: str, batch: int, seq: int, *, abstract: bool = False):
    """(a fresh jitted step, its arguments) for measuring one step: a full forward over
    [batch, seq] tokens, or one decode step over a KV cache of ``seq`` columns (donated, written at
    column seq // 2). ``abstract``: the arguments are ``ShapeDtypeStruct``s (for ``plan``: nothing
    is allocated; ``lifted.weights`` may be abstract too). A fresh jit every call, so a caller may
    trace it again under its own context (profiling's named scopes)."""
    in_shard = lifted.input_sharding(batch)
    t = seq if mode == "forward" else 1
    if abstract:
        ids = jax.ShapeDtypeStruct((batch, t), jnp.int32, sharding=in_shard)
    else:
        ids = lifted.put_input(np.ones((batch, t), np.int32))
    if mode == "forward":
        from sharding import shardings_of

        program = jax.jit(lifted.logits_fn, in_shardings=(shardings_of(lifted.placements, lifted.mesh), in_shard))
        return program, (lifted.weights, ids)
    replicated = NamedSharding(lifted.mesh, P())
    if abstract:
        cache = kv_cache.layout(lifted, batch, seq)
        column = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    else:
        cache = jax.jit(lambda: kv_cache.empty(lifted, batch, seq))()
        column = jnp.asarray(seq // 2, jnp.int32)
    program = jax.jit(lambda w, i, c, col: decode_step(lifted, w, i[:, 0], c, col), donate_argnums=(2,))
    return program, (lifted.weights, ids, cache, column)


def next_args(mode: str, args, out):
    """The arguments to run a ``step_program`` again after it returned ``out``: a decode step donated
    its cache, so the next one takes the cache it returned (the same column is written again, so
    every step computes the same logits). A fresh cache per step instead cost ~10 ms of zero-filling
    per SmolLM2 b8 step inside ``profile``'s trace (Zen 3, AVX2)."""
    return args if mode == "forward" else (*args[:2], out[1], args[3])
