"""torchax's half of lifting: a torch module's forward as a pure JAX function of its tensors."""

from __future__ import annotations

import jax.numpy as jnp
import torch

from bridge.torchax_compat import import_torchax


def torchax_with_lowerings():
    """torchax, its default environment holding the bridge's lowerings (``bridge.lowerings``: the
    small-batch kernels, attention over the KV cache, int8 products): how the bridge uses torchax."""
    from bridge import lowerings

    tx = import_torchax()
    lowerings.install(tx.default_env())  # once per environment
    return tx


def jax_dtype(torch_dtype: torch.dtype):
    """The JAX dtype of a torch dtype (torch.bfloat16 -> jnp.bfloat16, ...)."""
    return jnp.dtype(str(torch_dtype).removeprefix("torch."))


def extract(model: torch.nn.Module):
    """(weights, fn) of ``model`` through torchax. Tied weights are kept once."""
    tx = torchax_with_lowerings()
    model.eval()
    with torch.no_grad():
        return tx.extract_jax(model)


def extract_fn(model: torch.nn.Module):
    """(names -> (shape, torch dtype), fn): ``extract`` without converting any weight, so ``model``
    may live on the meta device; the weights come from elsewhere (a checkpoint, abstract shapes)."""
    tx = torchax_with_lowerings()
    from torchax.interop import JittableModule

    model.eval()
    jm = JittableModule(model, dedup_parameters=True)
    env = tx.default_env()
    names = {**{k: (tuple(v.shape), v.dtype) for k, v in jm.buffers.items()},
             **{k: (tuple(v.shape), v.dtype) for k, v in jm.params.items()}}  # fmt: skip

    def fn(states, args, kwargs=None):  # as torchax.extract_jax's jax_func
        params = {k: states[k] for k in jm.params}
        buffers = {k: states[k] for k in jm.buffers}
        params, buffers, args, kwargs = env.j2t_iso((params, buffers, args, kwargs or {}))
        with env:
            out = jm.functional_call("forward", params, buffers, *args, **kwargs)
        return env.t2j_iso(out)

    return names, fn
