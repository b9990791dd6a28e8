"""torchax's half of lifting: a torch module's forward as a pure JAX function of its tensors."""

from __future__ import annotations

import sys

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


_registered_outputs: set = set()


def as_jax_pytree(out):
    """``out`` with every transformers ``ModelOutput`` class in it registered as a JAX pytree (an
    ordered dict of its non-None fields, rebuilt as the same class), so a lifted forward returns what
    the module returns (``BaseModelOutputWithPooling`` and friends are not pytrees to JAX; torch's
    pytree knows them, which is how torchax converted their tensors)."""
    import jax

    def visit(x):
        cls = type(x)
        if cls not in _registered_outputs and _is_model_output(x):
            jax.tree_util.register_pytree_node(
                cls, lambda o: (tuple(o.values()), tuple(o.keys())),
                lambda keys, values, cls=cls: cls(**dict(zip(keys, values))))  # fmt: skip
            _registered_outputs.add(cls)
        if isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(out)
    return out


def _is_model_output(x) -> bool:
    if "transformers" not in sys.modules:  # a model that does not use transformers: never import it
        return False
    from transformers.utils import ModelOutput

    return isinstance(x, ModelOutput)


def extract(model: torch.nn.Module):
    """(weights, fn) of ``model`` through torchax. Tied weights are kept once."""
    tx = torchax_with_lowerings()
    model.eval()
    with torch.no_grad():
        weights, fn = tx.extract_jax(model)
    return weights, lambda *args, **kwargs: as_jax_pytree(fn(*args, **kwargs))


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
        return as_jax_pytree(env.t2j_iso(out))

    return names, fn
