"""The contract between a causal language model and the bridge: everything the bridge asks of a
model, in one place. Plain torch (no JAX): a model states these facts about itself, and the bridge
calls them instead of guessing with ``hasattr``/``getattr`` or name patterns.

Our families (``llama.py``, ``neox.py``, ``grok.py``) implement it through ``common.CausalLM``; a
model from elsewhere (a transformers class through an adapter) implements the same methods.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

@contextlib.contextmanager
def graph_mode():
    """How torch runs while a model is traced into a graph (the bridge's trace, the adapter's probe on
    fake tensors), as torch.export's non-strict trace sets it: the "compiling" flag on, so code that
    keeps data-dependent Python branches out of compiled graphs takes its graph path (transformers'
    ``is_torchdynamo_compiling()``: XGLM's check that its position table is long enough); and
    ``torch.distributions`` argument validation off (a data check: Gemma-3n's Gaussian top-k builds
    a ``Normal``). Torch's own settings come back afterwards."""
    from torch.distributions import Distribution

    compiling, torch.compiler._is_compiling_flag = torch.compiler._is_compiling_flag, True
    validate = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = compiling
        Distribution.set_default_validate_args(validate)


# One attention layer's cache: (keys, values), each [batch, kv_heads, max_seq, head_dim]; a sparse-
# attention layer (DeepSeek-V3.2's indexer) adds its indexer's keys, [batch, max_seq, dim].
LayerKV = tuple[torch.Tensor, ...]


class StateCache(NamedTuple):
    """One layer's cache that is a state rather than (only) keys and values: a Mamba or linear-
    attention layer's convolution window and recurrent state, each [batch, ...] with no sequence dim,
    read and returned whole by every step (as functional as a KV pair, and donated the same way).
    ``kv``: a hybrid layer's own (keys, values) beside its state; empty otherwise. A layer with no
    cache at all (one that reads another layer's) is a StateCache of empty tuples.

    A state has no columns: a call of several tokens starts it from zeros (the generator's prefill
    writes columns 0..T-1), a call of one token continues it."""

    conv: tuple = ()
    recurrent: tuple = ()
    kv: tuple = ()


KVCache = list[Union[LayerKV, StateCache]]
# A scanned stack's cache is one (keys, values) pair with a leading layer dim: [layers, batch,
# kv_heads, max_seq, head_dim]. The bridge chooses the layout (``bridge.kv_cache``); this rank is how
# the model's cache and the bridge's scan tell the two apart.
STACKED_KV_RANK = 5


def is_stacked(keys) -> bool:
    """Whether ``keys`` (a cache tensor, or an array standing for one) is a scanned stack's."""
    return getattr(keys, "ndim", 0) == STACKED_KV_RANK


class LayerCaches:
    """The KV cache as a forward writes it, gpt-fast's ``KVCache.update``: each layer hands its new
    keys/values to ``update`` with its index and attends over what comes back. One object for every
    layer, so the layers' calls differ only in their input (the bridge scans such a stack, and
    swaps ``update`` for a write into the stack the scan carries).

    ``layers``: the ``KVCache`` list, per layer (keys, values) [B, H, S, D], or one stacked pair
    [L, B, H, S, D] (a scanned stack's layout). Functional: ``update`` replaces entries of
    ``layers``, never writes a tensor in place."""

    def __init__(self, layers: KVCache):
        self.layers = list(layers)
        self.stacked = len(self.layers) == 1 and is_stacked(self.layers[0][0])

    @property
    def length(self) -> int:
        """Columns (positions) each layer's cache holds."""
        return self.layers[0][0].shape[-2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor) -> LayerKV:
        """Writes ``k``/``v`` [B, H, T, D] at ``cache_position`` [T] columns of ``layer``'s cache;
        returns that layer's whole (keys, values)."""
        if self.stacked:  # outside a scan: the layer's slice written, then put back in the stack
            stack = self.layers[0]
            new = tuple(s[layer].index_copy(2, cache_position, x.to(s.dtype)) for s, x in zip(stack, (k, v)))
            at = torch.tensor([layer], device=k.device)
            self.layers[0] = tuple(s.index_copy(0, at, n[None]) for s, n in zip(stack, new))
            return new
        keys, values = self.layers[layer]
        self.layers[layer] = (keys.index_copy(2, cache_position, k.to(keys.dtype)),
                              values.index_copy(2, cache_position, v.to(values.dtype)))  # fmt: skip
        return self.layers[layer]
# (name regex, dim, unit): a tensor whose name matches keeps whole heads of ``unit`` rows on ``dim``.
HeadLayout = list[tuple[str, int, int]]


class CausalLMContract(nn.Module):
    """What the bridge needs from a causal LM. Subclasses fill in the class attributes and methods.

    ``config`` must carry ``vocab_size`` and ``max_position_embeddings`` (the context the generator
    enforces), or the subclass answers ``vocab_size`` and ``context_length`` itself (a composite
    config keeps them in its text model's config).
    """

    config: Any

    # (regex, replacement) applied to checkpoint keys before loading, first match wins (older files
    # with other names for a tensor: NeoX's ``embed_out`` head, say).
    CHECKPOINT_RENAMES: ClassVar[Sequence[tuple[str, str]]] = ()
    # Dotted path of the ``nn.ModuleList`` of decoder layers, e.g. ``"model.layers"``.
    DECODER_LAYERS: ClassVar[str] = ""
    # Attribute names, inside one decoder layer, of the blocks profiling names (attention, MLP).
    LAYER_BLOCKS: ClassVar[tuple[str, ...]] = ()
    # False for a model that can only run a full sequence (no functional KV cache: no generation).
    HAS_KV_CACHE: ClassVar[bool] = True
    # Why the model decodes by recomputing its whole token history each step (a class whose own
    # cache cannot be passed in and out: its "cache" is then the ids and positions so far), or None.
    recompute_reason: Optional[str] = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        cache_position: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[KVCache]]:
        """``input_ids`` [B, T] -> (logits [B, T, V], the new cache or None).

        ``kv_cache``: the list returned by ``init_kv_cache`` (or by a previous call), passed in and
        returned, never mutated in place. ``cache_position`` [T]: the cache columns this call writes
        (the same for every row: prompts are left-padded). ``positions`` [B, T]: RoPE positions per
        row. ``attention_mask`` [B, S]: 1 for cache columns holding real tokens, 0 for padding.
        Without a cache, the call is a plain causal forward over ``input_ids``.
        """
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding that token ids index."""
        return self.config.vocab_size

    @property
    def context_length(self) -> int:
        """Positions (prompt + new tokens) the generator allows."""
        return self.config.max_position_embeddings

    def init_kv_cache(self, batch: int, max_seq: int, dtype=None, device=None) -> KVCache:
        """Zeros of the cache layout: one (keys, values) pair per layer, each
        [batch, ``kv_cache_heads``, max_seq, head_dim], or a ``StateCache`` for a layer that keeps a
        state. The bridge builds it on the meta device to read shapes, and allocates it itself on
        the mesh."""
        raise NotImplementedError

    @property
    def kv_cache_heads(self) -> int:
        """How many kv heads dim 1 of each cache tensor holds (the scheme's head axis splits it)."""
        raise NotImplementedError

    @property
    def query_heads(self) -> int:
        """How many attention (query) heads each layer has."""
        raise NotImplementedError

    def head_layout(self) -> HeadLayout:
        """Which weights hold whole attention heads on which dim, so tensor parallelism never splits
        a head across devices (see ``sharding.resolve_placements``)."""
        raise NotImplementedError

    def parallel_plan(self) -> list[tuple[str, Optional[int]]]:
        """The model's own tensor-parallel plan as (parameter-name regex, dim to split over the
        tensor-parallel axis, or None to keep it whole) rows, placed ahead of a tp scheme's table.
        Empty (the default) when the scheme's built-in rows already cover the model's names."""
        return []

    def kv_projections(self) -> list[tuple[str, int]]:
        """(name regex, head_dim) of the weights whose dim 0 holds the kv heads one after another
        (k/v projections, their biases and int8 scales), computed by ``view(.., -1, head_dim)`` so
        that more heads in the weight mean more kv heads. With fewer kv heads than the tensor-
        parallel axis, the bridge repeats each head there (as vLLM does) instead of replicating the
        projection. Empty: not supported by this model."""
        return []

    def repeated_kv_heads(self, copies: int):
        """A context manager the bridge holds while tracing with each kv head repeated ``copies``
        times in the ``kv_projections`` weights, for a model whose attention keeps its kv-group
        count as state (transformers' ``num_key_value_groups``). Ours infer it from the weights."""
        import contextlib

        return contextlib.nullcontext()

    def split_fused_projections(self) -> None:
        """Before tensor parallelism: rewrite projections that fuse differently-split outputs
        ([Q;K;V], [gate;up]) so each part splits over the axis on its own. Numerics unchanged.
        The default does nothing (our families keep q/k/v and gate/up apart already)."""

    def index_routed_experts(self) -> list[nn.Module]:
        """MoE experts modules that gather each expert's tokens by ``nonzero`` / one-argument
        ``torch.where`` and scatter the results back with ``index_add_`` (transformers' own experts
        loop, DBRX's): data-dependent shapes, which a trace gives a static size, every list padded
        with an index past the end; the padded rows compute on whatever a gather returns there
        and the scatter drops them. Empty (the default) for models that route with static shapes."""
        return []

    def tied_parameters(self) -> dict[str, str]:
        """Parameter name -> the name of the parameter it is tied to (a head sharing the embedding:
        ``{"lm_head.weight": "model.embed_tokens.weight"}``). Checkpoints may leave the tied name
        out, and loading ties it again."""
        return {}

    def decoder_layers(self) -> list[tuple[str, nn.Module]]:
        """(qualified name, module) of each decoder layer, in order: fsdp pins each layer's
        activations, and profiling names each layer's ops."""
        stack = self.get_submodule(self.DECODER_LAYERS)
        return [(f"{self.DECODER_LAYERS}.{i}", layer) for i, layer in enumerate(stack)]

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """(scope name, module) for profiling: each decoder layer (``layers.3``) and its
        ``LAYER_BLOCKS`` (``layers.3.self_attn``, ``layers.3.mlp``)."""
        prefix = self.DECODER_LAYERS.rpartition(".")[0]
        out = []
        for name, layer in self.decoder_layers():
            short = name.removeprefix(f"{prefix}.") if prefix else name
            out.append((short, layer))
            out += [(f"{short}.{b}", getattr(layer, b)) for b in self.LAYER_BLOCKS]
        return out
