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


def plain_outputs(out, classes: dict | None = None, path: str = ""):
    """``out`` with each transformers ``ModelOutput`` in it as a plain dict of its fields (JAX's
    export serializes dicts, not classes it cannot name on load); ``classes`` collects path ->
    ``module:qualname`` of each one replaced ('' for the outputs themselves)."""
    if type(out) in _registered_outputs:
        if classes is not None:
            classes[path] = f"{type(out).__module__}:{type(out).__qualname__}"
        return {k: plain_outputs(v, classes, f"{path}.{k}") for k, v in out.items()}
    if isinstance(out, dict):
        return {k: plain_outputs(v, classes, f"{path}.{k}") for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(plain_outputs(v, classes, f"{path}.{i}") for i, v in enumerate(out))
    return out


def _is_model_output(x) -> bool:
    if "transformers" not in sys.modules:  # a model that does not use transformers: never import it
        return False
    from transformers.utils import ModelOutput

    return isinstance(x, ModelOutput)


@contextlib.contextmanager
def traced_as_torch(model: torch.nn.Module):
    """While ``model`` is traced:

    * torch in graph mode (``model_torch.contract.graph_mode``: the "compiling" flag on, as
      torch.export's non-strict trace sets it, distributions' data checks off);
    * inside a causal LM's ``index_routed_experts`` (DBRX's experts loop), index lists of static
      size (``lowerings.padded_index_lists_in``);
    * torch's fused attention fast path off (torchax cannot trace its nested tensors), with what
      that path would return in eager torch kept: eager ``nn.TransformerEncoder`` given a padding
      mask (eval mode, fast path on: torch's defaults) returns zeros at the padded positions before
      its final norm, so each such encoder's last layer has its padded rows zeroed here too.

    Torch's own settings are restored afterwards: importing or using the bridge leaves eager torch
    as it was."""
    from bridge import lowerings
    from model_torch.contract import CausalLMContract, graph_mode

    eager_fast_path = torch.backends.mha.get_fastpath_enabled()
    handles = []
    if eager_fast_path:
        for m in model.modules():
            if isinstance(m, torch.nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and not m.training:
                handles += _zero_padded_rows(m)
    torch.backends.mha.set_fastpath_enabled(False)
    experts = model.index_routed_experts() if isinstance(model, CausalLMContract) else []
    try:
        with graph_mode(), lowerings.padded_index_lists_in(experts):
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


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """``model`` in eval mode while active; every submodule's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def modes_of(model: torch.nn.Module) -> tuple[bool, ...]:
    """Every submodule's ``training`` flag, in order: what a program traced in train mode depends on."""
    return tuple(m.training for m in model.modules())


class Extracted:
    """A torch module's ``forward`` as pure JAX functions of its tensors (torchax underneath).

    ``fn(states, args, kwargs)`` runs the module in eval mode (inference: what lifting is for).
    ``fn.training(states, key, args, kwargs)`` runs it in the modes its submodules have when traced
    and returns ``(outputs, buffers)``: the buffers after the call (BatchNorm's running statistics
    and counter, updated as torch updates them), and dropout drawing from ``key``."""

    def __init__(self, model: torch.nn.Module):
        tx = torchax_with_lowerings()
        from torchax.interop import JittableModule

        self.model = model
        self.module = JittableModule(model, dedup_parameters=True)
        self.env = tx.default_env()

    def shapes(self) -> dict:
        jm = self.module
        return {**{k: (tuple(v.shape), v.dtype) for k, v in jm.buffers.items()},
                **{k: (tuple(v.shape), v.dtype) for k, v in jm.params.items()}}  # fmt: skip

    def weights(self) -> dict:
        """The module's tensors as jax arrays (a copy; tied ones once)."""
        with torch.no_grad():
            return self.env.t2j_copy({**self.module.buffers, **self.module.params})

    def _call(self, states, args, kwargs):
        jm, env = self.module, self.env
        params = {k: states[k] for k in jm.params}
        buffers = {k: states[k] for k in jm.buffers}
        params, buffers, args, kwargs = env.j2t_iso((params, buffers, args, kwargs or {}))
        with env, traced_as_torch(self.model):
            out = jm.functional_call("forward", params, buffers, *args, **kwargs)
        return as_jax_pytree(env.t2j_iso(out)), env.t2j_iso(buffers)

    def __call__(self, states, args, kwargs=None):
        with evaluating(self.model):
            return self._call(states, args, kwargs)[0]

    def training(self, states, key, args, kwargs=None):
        with self.env.override_property(prng=key):
            return self._call(states, args, kwargs)


def extract(model: torch.nn.Module):
    """(weights, fn) of ``model`` through torchax (``Extracted``). Tied weights are kept once."""
    fn = Extracted(model)
    return fn.weights(), fn


def extract_fn(model: torch.nn.Module):
    """(names -> (shape, torch dtype), fn): ``extract`` without converting any weight, so ``model``
    may live on the meta device; the weights come from elsewhere (a checkpoint, abstract shapes)."""
    fn = Extracted(model)
    return fn.shapes(), fn
