"""Our own JAX lowerings for a few torch functions, installed into torchax's environment.

torchax lowers ``F.linear`` as ``jnp.einsum("...a,ba->...b", x, w)``. For one token (decode), XLA:CPU
turns that into a single-threaded Eigen matrix-vector call that reads weights at ~17 GB/s on this
machine. Written as ``x @ w.T`` the same product becomes a loop fusion that XLA splits across the
cores (~24-31 GB/s): SmolLM2 decode goes from ~31 to ~43 tokens/s (``benchmarks/decode.py``).

One more step is needed for that fusion to be fast: XLA fuses the cheap elementwise ops that produce
``x`` (the RMSNorm scale, SiLU(gate) * up, the attention combine) into the matrix-vector loop, which
then recomputes them once per output row. A reduction is never fused into a consumer that reuses its
elements, so a one-token input is first materialised by a sum over a stacked zero (exact: ``x + 0``).

Numerics are unchanged: the same fp32 products and sums (parity tests hold at 1e-4 and greedy
tokens equal HF's). ``install`` is idempotent and runs from ``torchax_compat.import_torchax``, so every
torchax user in this repository lowers the same way.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import torch
import torch.nn.functional as F

_installed: set[int] = set()


def materialized(x: jnp.ndarray) -> jnp.ndarray:
    """``x`` computed once into its own buffer (see the module docstring)."""
    return jnp.stack([x, jnp.zeros_like(x)]).sum(0)


def linear(x: jnp.ndarray, weight: jnp.ndarray, bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """``F.linear``: ``x @ weight.T + bias`` with weight ``[out, in]``."""
    if math.prod(x.shape[:-1]) == 1:  # one token: a matrix-vector product (decode)
        x = materialized(x)
    y = x @ weight.T
    return y if bias is None else y + bias


def install(env) -> None:
    """Registers the lowerings above in a torchax ``Environment`` (once per environment)."""
    if id(env) in _installed:
        return
    from torchax.interop import call_jax

    def torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return call_jax(linear, x, weight, bias)

    env.override_op_definition(F.linear, torch_linear)
    _installed.add(id(env))
