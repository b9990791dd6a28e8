"""The core flow: torch module -> ``torchax.extract_jax`` -> weights on a mesh by rule table -> jit.

    lifted = lift(model, mesh, "tp")           # weights placed by sharding.SCHEMES["tp"]
    logits = lifted.forward(input_ids)         # jitted, compiled once per input shape

``lifted.fn(weights, args, kwargs)`` is the pure JAX function of the module's ``forward``; everything
else (generation, profiling, comparisons) is built on it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sharding
from bridge.torchax_compat import import_torchax


def extract(model: torch.nn.Module):
    """(weights, fn) of ``model`` through torchax. Tied weights are kept once."""
    tx = import_torchax()
    model.eval()
    with torch.no_grad():
        return tx.extract_jax(model)


@dataclasses.dataclass
class Lifted:
    model: torch.nn.Module
    fn: Any  # fn(weights, args_tuple, kwargs_dict) -> (logits, kv_cache)
    weights: dict[str, jax.Array]
    mesh: Mesh
    scheme: sharding.Scheme
    placements: dict[str, sharding.Placement]

    def __post_init__(self):
        self._forward = {}

    # -- specs ----------------------------------------------------------------------------------
    def input_sharding(self, batch: int, rank: int = 2) -> NamedSharding:
        return NamedSharding(self.mesh, sharding.batch_spec(self.scheme, self.mesh, batch, rank))

    def kv_sharding(self, batch: int) -> NamedSharding:
        kv_heads = getattr(self.model.config, "num_kv_heads", 1)
        return NamedSharding(self.mesh, sharding.kv_cache_spec(self.scheme, self.mesh, batch, kv_heads))

    def report(self) -> dict:
        return sharding.report(self.placements, dict(self.mesh.shape))

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
        ids = jnp.asarray(np.asarray(ids, dtype=np.int32))
        return jax.device_put(ids, self.input_sharding(ids.shape[0], ids.ndim))

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
    scheme: sharding.Scheme | str = "tp",
    *,
    fallback: str = "error",
) -> Lifted:
    """Lifts ``model`` with torchax and places its weights on ``mesh`` by ``scheme``'s rule table.

    Every placement is validated before anything is put on a device.
    """
    scheme = sharding.get_scheme(scheme)
    weights, fn = extract(model)
    head_layout = model.head_layout() if hasattr(model, "head_layout") else []
    placed, placements = sharding.shard(weights, mesh, scheme, head_layout=head_layout, fallback=fallback)
    del weights
    return Lifted(model, fn, placed, mesh, scheme, placements)


def to_numpy(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))
