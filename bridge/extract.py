"""torchax's half of lifting: a torch module's forward as a pure JAX function of its tensors."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def traced_as_torch(model: torch.nn.Module):
    """While ``model`` is traced: torch's fused attention fast path off (torchax cannot trace its
    nested tensors), with what that path would return in eager torch kept. Eager
    ``nn.TransformerEncoder`` given a padding mask (eval mode, fast path on: torch's defaults)
    returns zeros at the padded positions before its final norm, so each such encoder's last layer
    has its padded rows zeroed here too. Torch's own setting is restored afterwards: importing or
    using the bridge leaves eager torch as it was."""
    eager_fast_path = torch.backends.mha.get_fastpath_enabled()
    handles = []
    if eager_fast_path:
        for m in model.modules():
            if isinstance(m, torch.nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and not m.training:
                handles += _zero_padded_rows(m)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(eager_fast_path)
        for h in handles:
            h.remove()


def _zero_padded_rows(encoder: torch.nn.TransformerEncoder) -> list:
    """Hooks that zero ``encoder``'s last layer output where ``src_key_padding_mask`` marks padding,
    when eager torch (under ``torch.no_grad``, as inference runs) would take the nested-tensor path:
    a 3-d input, a padding mask with the padding at the end of each row, no attention mask."""
    seen = {}

    def before(layer, args, kwargs):  # the first layer sees what the encoder was given
        src = args[0] if args else kwargs.get("src")
        pad, mask = kwargs.get("src_key_padding_mask"), kwargs.get("src_mask")
        seen["pad"] = pad if (pad is not None and mask is None and src.dim() == 3) else None

    def after(module, args, out):
        pad = seen.get("pad")
        if pad is None:
            return out
        padded = pad if pad.dtype == torch.bool else pad.isinf()  # float masks mark padding with -inf
        zeroed = out.masked_fill((padded if encoder.layers[0].self_attn.batch_first else padded.T).unsqueeze(-1), 0.0)
        if not getattr(encoder, "mask_check", True):
            return zeroed
        # torch takes that path only when every row's padding is at its end (its mask check)
        at_end = (padded[:, 1:] >= padded[:, :-1]).all()
        return torch.where(at_end, zeroed, out)

    # Hooks on the layers, not the encoder: torchax calls the root module's forward directly.
    return [encoder.layers[0].register_forward_pre_hook(before, with_kwargs=True),
            encoder.layers[-1].register_forward_hook(after)]  # fmt: skip


def extract(model: torch.nn.Module):
    """(weights, fn) of ``model`` through torchax. Tied weights are kept once."""
    tx = torchax_with_lowerings()
    model.eval()
    with torch.no_grad():
        weights, fn = tx.extract_jax(model)

    def traced(*args, **kwargs):
        with traced_as_torch(model):
            return as_jax_pytree(fn(*args, **kwargs))

    return weights, traced


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
        with env, traced_as_torch(model):
            out = jm.functional_call("forward", params, buffers, *args, **kwargs)
        return as_jax_pytree(env.t2j_iso(out))

    return names, fn
