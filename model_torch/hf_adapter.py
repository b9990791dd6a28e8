"""transformers' own causal LMs behind the model contract: the user's model definition, unchanged,
with a functional KV cache (plain torch, no JAX).

``HFCausalLMAdapter(hf_model)`` speaks the same protocol as our own families: ``forward(input_ids,
positions, kv_cache, cache_position, attention_mask) -> (logits, new kv_cache)`` with the cache a
list of (keys, values) tensors passed in and returned. Inside, each call wraps the tensors passed in
as transformers' static cache layers, runs the HF module, and reads the layers' tensors back out.
What transformers 5.23's cache does, and what that means here:

* ``StaticLayer.update`` writes at ``arange(T) + cumulative_length`` and then advances that tensor in
  place; models take their positions from ``get_seq_length()`` (that tensor) and no longer accept
  ``cache_position``. So each layer gets its own position tensor set to ``cache_position[0]``.
* Sliding-window layers (``StaticSlidingWindowLayer``) branch on a Python int of the length, which a
  trace bakes in; every layer here is a full-length ``StaticLayer`` and the sliding-window *mask*
  does the windowing (same numbers; costs the memory of a full-length cache for those layers).
* MoE experts dispatch with ``nonzero()`` by default (data-dependent: fails under jit);
  ``experts_implementation="batched_mm"`` is used instead. A class whose experts have no such
  implementation and loop over ``nonzero`` themselves (DBRX) is named by ``index_routed_experts``:
  the bridge traces that loop over index lists of static size (``bridge.lowerings``).
* A sparse-attention layer (DeepSeek-V3.2, GLM-5: ``StaticIndexedLayer``) caches its indexer's keys
  beside its keys and values: a third tensor of the layer's cache entry, [batch, max_seq, dim].
* Attention runs ``sdpa`` (the bridge installs a lowering with a finite mask value and grouped kv
  heads) where the class offers it, its own ``eager`` attention elsewhere (GPT-J, GPT-Neo, BLOOM, ...) and for Gemma2's soft-capping.
* ``ModelOutput`` is not a pytree: the adapter returns plain tensors.

* Recurrent and linear-attention layers (Mamba, Qwen3-Next's gated delta net, LFM's convolutions,
  hybrids) keep a state instead of, or beside, keys and values: transformers' ``LinearAttentionLayer``
  holds it, and here it is a ``StateCache`` (its conv and recurrent tensors, [batch, ...]) passed in
  and returned like a KV pair. The layer takes its decode path on a one-token call (a zero state
  continued is the prefill of one token) and its full-sequence path on a longer one, which starts
  from zeros (the generator's prefill).

* A class whose cache cannot be passed in and out (a cache class of its own: DeepSeek-V4, MiniMax;
  state in module attributes: RecurrentGemma; none: OpenAI-GPT, RWKV; a cache length read as a
  Python number: MPT, RoFormer) keeps its token history instead and recomputes it every step
  (``recompute_reason``, ``_recomputed``): correct, O(context) per token.

Encoder-decoders are refused with one clear error, and so is a class that runs neither over a cache
nor without one (XLM reads its input's data as a number); any other layer type is tried.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from .contract import CausalLMContract, HeadLayout, KVCache, StateCache, graph_mode

# The context of a model with no position limit (ALiBi, or a recurrent state), as the generator enforces it.
NO_FIXED_CONTEXT = 16384


class UnsupportedArchitecture(ValueError):
    """The model cannot run as a decoder over a functional cache."""


def check_architecture(config) -> None:
    """Raises UnsupportedArchitecture naming the model type and why, or returns. Only encoder-
    decoders are refused up front: any layer type of a decoder is tried (its cache layer, as
    transformers builds it, says what the step carries)."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitecture(f"model type {model_type!r} is an encoder-decoder; only decoder-only causal LMs run here")


@dataclass
class LayerCacheShapes:
    """One layer's cache as the probe found it (batch 1): its kv heads and key/value dims when it
    keeps keys and values, the dim of its indexer keys when a sparse-attention indexer (DeepSeek-V3.2,
    GLM-5) keeps them beside, and (shape, dtype) of each conv / recurrent state it keeps, by state index."""

    kv: Optional[tuple[int, int, int]] = None
    indexer: Optional[int] = None
    conv: dict = field(default_factory=dict)
    recurrent: dict = field(default_factory=dict)

    @property
    def has_state(self) -> bool:
        return self.kv is None or bool(self.conv or self.recurrent)


def attention_implementation(config) -> str:
    """``sdpa`` where the class offers it (the bridge lowers it, and reaches the cache kernels
    through it), else the class's own ``eager`` attention, which torchax lowers op by op (GPT-J,
    GPT-Neo, BLOOM, CodeGen, MPT, ... have no SDPA path); ``eager`` too where soft-capped attention
    logits need it (Gemma-2)."""
    text = config.get_text_config(decoder=True)
    if getattr(text, "attn_logit_softcapping", None):
        return "eager"
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", True) else "eager"


class HFCausalLMAdapter(CausalLMContract):
    """A transformers ``*ForCausalLM`` behind the model contract (see the module docstring)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        check_architecture(hf_model.config)
        # The HF model's children become ours, so parameter names are exactly the checkpoint's
        # (``model.layers.0.self_attn.q_proj.weight``) and its tp plan applies as written; the HF
        # module itself is kept outside the module tree and called in forward.
        object.__setattr__(self, "hf", hf_model)
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        self.config = hf_model.config
        self.text_config = hf_model.config.get_text_config(decoder=True)
        # Attribute paths the contract exposes: found from the module tree (the one ModuleList of
        # decoder layers), not from a table of names.
        self.DECODER_LAYERS = _decoder_stack_path(hf_model)
        self.LAYER_BLOCKS = _layer_blocks(self.get_submodule(self.DECODER_LAYERS)[0]) if self.DECODER_LAYERS else ()
        self._cache_shapes = None
        self._recompute_reason = None

    # -- the contract -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return getattr(self.text_config, "vocab_size", None) or self.config.vocab_size

    @property
    def context_length(self) -> int:
        """The text model's position limit under whichever name its config uses; a model without
        one (ALiBi: BLOOM) is held to ``NO_FIXED_CONTEXT``."""
        for name in ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length"):
            value = getattr(self.text_config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return NO_FIXED_CONTEXT

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        cache_position: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ):
        if kv_cache is None:
            return self._uncached(input_ids, positions, attention_mask).logits, None
        if self.recompute_reason is not None:
            return self._recomputed(input_ids, positions, kv_cache, cache_position, attention_mask)
        if cache_position is None:
            cache_position = torch.arange(input_ids.shape[1], device=input_ids.device)
        shapes = self.cache_shapes()
        decode = input_ids.shape[1] == 1
        cache = self._wrap(kv_cache, cache_position[0], continue_state=decode)
        # Columns past the end of this call hold nothing yet: hidden whatever the mask says (a causal
        # model's own mask hides them too; a bidirectional one, BERT-style with is_decoder=False,
        # would attend to the empty columns). The cache length is the keys' second-to-last dim,
        # whatever the layout (a stacked cache has a leading layer dim).
        length = _cache_length(kv_cache)
        if length is not None:
            cols = torch.arange(length, device=input_ids.device)
            written = (cols <= cache_position[-1]).to(torch.long)[None]
            attention_mask = written.expand(input_ids.shape[0], -1) if attention_mask is None else attention_mask * written
        if any(s.has_state for s in shapes) and attention_mask is not None:
            # State layers read the mask's last T columns as this call's padding (transformers' own
            # masks are as long as the tokens seen): a prefill's are its first T; a decode step
            # has no padding (a model without attention layers takes no mask then).
            if not decode:
                attention_mask = attention_mask[:, : input_ids.shape[1]]
            elif length is None:
                attention_mask = None
        if positions is None:
            positions = cache_position[None].expand(input_ids.shape[0], -1)
        out = self.hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            **{_cache_argument(self.hf): cache},
        )
        return out.logits, [_unwrap(layer, s) for layer, s in zip(cache.layers, shapes)]

    def _uncached(self, input_ids, positions, attention_mask):
        """The whole sequence through the HF model without a cache (position ids where the class takes
        them by name); module attributes its forward assigns are put back."""
        named = inspect.signature(self.hf.forward).parameters
        extra = {"position_ids": positions} if "position_ids" in named else {}
        with _attributes_put_back(self.hf):
            return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)

    def _recomputed(self, input_ids, positions, kv_cache, cache_position, attention_mask):
        """A class whose cache cannot be passed in and out (``recompute_reason``) keeps its token
        history instead: this call's ids and positions are written at their columns and the model
        runs over every column, each row rolled so that its first real token comes first (its left
        padding, and the columns not written yet, trail it masked: a causal model's earlier columns
        never see later ones, and a recurrent state or a compression block starts where the row
        does, as without padding); the logits of this call's columns come back."""
        (history,) = kv_cache
        seen_ids, seen_positions = history.recurrent
        batch, columns = seen_ids.shape
        if positions is None:
            positions = cache_position[None].expand(batch, -1)
        seen_ids = seen_ids.index_copy(1, cache_position, input_ids.to(seen_ids.dtype))
        seen_positions = seen_positions.index_copy(1, cache_position, positions.to(seen_positions.dtype))
        cols = torch.arange(columns, device=input_ids.device)
        mask = (cols <= cache_position[-1]).to(torch.long)[None].expand(batch, -1)
        pads = torch.zeros(batch, 1, dtype=torch.long, device=input_ids.device)
        if attention_mask is not None:  # [batch, columns], 0 on each row's left padding (its leading zeros)
            mask = mask * attention_mask
            pads = (attention_mask.cumsum(-1) == 0).sum(-1, keepdim=True)
        rolled = (cols[None] + pads) % columns  # the column of each row's i-th real token
        logits = self._uncached(seen_ids.gather(1, rolled), seen_positions.gather(1, rolled), mask.gather(1, rolled)).logits
        here = (cache_position[None] - pads)[..., None].expand(-1, -1, logits.shape[-1])
        return logits.gather(1, here), [StateCache(recurrent=(seen_ids, seen_positions))]

    def init_kv_cache(self, batch: int, max_seq: int, dtype=None, device=None) -> KVCache:
        if self.recompute_reason is not None:  # the token history: ids and positions, [batch, max_seq] each
            return [StateCache(recurrent=tuple(torch.zeros(batch, max_seq, dtype=torch.int32, device=device) for _ in range(2)))]
        dtype = dtype or self.dtype

        def kv(heads, kd, vd):
            return (torch.zeros(batch, heads, max_seq, kd, dtype=dtype, device=device),
                    torch.zeros(batch, heads, max_seq, vd, dtype=dtype, device=device))  # fmt: skip

        def state(found: dict):  # a state kept in float32 by a bf16 model stays float32
            return tuple(torch.zeros(batch, *shape[1:], dtype=dtype if probe_dtype == self.dtype else probe_dtype, device=device)
                         for shape, probe_dtype in found.values())  # fmt: skip

        def indexer(dim):  # [batch, max_seq, dim]: one head's keys, written at the same columns
            return (torch.zeros(batch, max_seq, dim, dtype=dtype, device=device),) if dim else ()

        return [
            StateCache(state(s.conv), state(s.recurrent), kv(*s.kv) if s.kv else ()) if s.has_state else kv(*s.kv) + indexer(s.indexer)
            for s in self.cache_shapes()
        ]

    @property
    def kv_cache_heads(self) -> int:
        """The kv heads of the first attention layer (0 for a model without one: Mamba)."""
        heads = self.kv_layout()[0]
        return heads[0] if heads else 0

    @property
    def query_heads(self) -> int:
        return self.text_config.num_attention_heads

    def head_layout(self) -> HeadLayout:
        from .hf_plans import head_layout_from_plan

        return head_layout_from_plan(self)

    def parallel_plan(self) -> list[tuple[str, Optional[int]]]:
        from .hf_plans import parallel_plan_rows

        return parallel_plan_rows(self)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def __setattr__(self, name, value):
        # A child swapped on us (int8 quantization swaps modules) is swapped in the HF module too,
        # which is what forward runs.
        super().__setattr__(name, value)
        hf = self.__dict__.get("hf")
        if hf is not None and isinstance(value, nn.Module) and name in hf._modules:
            setattr(hf, name, value)

    def _attention_modules(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.named_modules() if hasattr(m, "num_key_value_groups")]

    def kv_projections(self) -> list[tuple[str, int]]:
        """Separate ``k_proj``/``v_proj`` Linears in every attention module that keeps a
        ``num_key_value_groups`` (Llama-style attention): their dim 0 holds the kv heads."""
        attention = self._attention_modules()
        if not attention or not all(isinstance(getattr(m, p, None), nn.Linear) for _, m in attention for p in ("k_proj", "v_proj")):
            return []
        return [(r"\.(k_proj|v_proj)\.(weight|bias|scale)$", self.kv_layout()[1][0])]

    def repeated_kv_heads(self, copies: int):
        """``num_key_value_groups`` divided by ``copies`` on every attention module while the bridge
        traces (then restored: the torch module itself is left as it was)."""
        import contextlib

        @contextlib.contextmanager
        def scope():
            saved = [(m, m.num_key_value_groups) for _, m in self._attention_modules()]
            try:
                for m, groups in saved:
                    m.num_key_value_groups = groups // copies
                yield
            finally:
                for m, groups in saved:
                    m.num_key_value_groups = groups

        return scope()

    def index_routed_experts(self) -> list[nn.Module]:
        """transformers' experts modules (``forward(hidden_states, top_k_index, top_k_weights)``):
        those with a static-shape implementation run it (``batched_mm``) and never index by data;
        the others (DBRX's) run their own loop over ``nonzero``."""
        return _experts_modules(self.hf)

    def split_fused_projections(self) -> None:
        """Phi-3's ``qkv_proj`` / ``gate_up_proj`` and GPT-2's Conv1D ``c_attn`` stack [Q;K;V] or
        [gate;up] on their output dim, so a dim-0 split would hand one device all of Q and another
        K and V. Each becomes ``FusedAsParts``: separate Linears (``q_proj``, ``k_proj``, ...)
        whose outputs are concatenated; each part splits by heads, and XLA folds the model's own
        slicing of the concatenation back onto the parts (no collective). Idempotent."""
        fused = [(name, m) for name, m in self.hf.named_modules() if name.rpartition(".")[2] in FUSED and _is_dense(m)]
        if not fused:  # read no head counts: per-layer configs (Gemma-4) have no global ones
            return
        text = self.text_config
        heads = getattr(text, "num_attention_heads", None)
        kv = getattr(text, "num_key_value_heads", None) or heads
        for name, module in fused:
            parent_name, _, leaf = name.rpartition(".")
            weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()  # [out, in]
            out = weight.shape[0]
            if len(FUSED[leaf]) == 3:  # [Q; K; V]: the head dim is what the output holds per head
                if not heads:
                    continue
                head_dim = out // (heads + 2 * kv)
                sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
            else:
                sizes = [out // 2] * 2
            if sum(sizes) != out:
                continue  # not the layout we know: leave it fused
            parts, start = {}, 0
            for part, size in zip(FUSED[leaf], sizes):
                lin = nn.Linear(weight.shape[1], size, bias=module.bias is not None, dtype=weight.dtype, device=weight.device)
                with torch.no_grad():
                    lin.weight.copy_(weight[start : start + size])
                    if module.bias is not None:
                        lin.bias.copy_(module.bias[start : start + size])
                parts[part] = lin
                start += size
            setattr(self.hf.get_submodule(parent_name), leaf, FusedAsParts(parts))

    # -- helpers ------------------------------------------------------------------------------------
    def cache_shapes(self) -> list[LayerCacheShapes]:
        """Each layer's cache, read off one forward on fake tensors (no memory, no data): every family
        names these config fields its own way; its cache update does not. Empty when the class
        decodes by recomputing (``recompute_reason``)."""
        if self._cache_shapes is None:
            self._cache_shapes, self._recompute_reason = self._probe_cache()
        return self._cache_shapes

    @property
    def recompute_reason(self) -> Optional[str]:
        """Why this class decodes by recomputing its whole token history every step (O(context) per
        token instead of O(1): correct, slow), or None when it decodes over its cache."""
        self.cache_shapes()
        return self._recompute_reason

    def _probe_cache(self) -> tuple[list[LayerCacheShapes], Optional[str]]:
        """(the layers' cache shapes, None), or ([], why) for a class whose cache the bridge cannot
        pass in and out: one of its own (DeepSeek-V4's compressed layers, MiniMax), state kept in
        module attributes (RecurrentGemma), none at all (OpenAI-GPT) or a ``state`` argument of its
        own (RWKV), or a cache length its code reads as a Python number (MPT's position-bias slice,
        RoFormer's and TrOCR's position ``arange``, GIT, CPM-Ant)."""
        from transformers import cache_utils as cu

        probe = cu.DynamicCache(config=self.config)
        ids = lambda: torch.zeros(1, 1, dtype=torch.long)  # noqa: E731 - made inside the fake mode
        try:
            assigned = _meta_call(self.hf, lambda: ((), {"input_ids": ids(), _cache_argument(self.hf): probe, "use_cache": True}))
        except Exception as e:  # noqa: BLE001 - the class's own reason, in one line (MiniMax: its own cache)
            return self._recomputing(f"it did not run one token over transformers' cache ({type(e).__name__}: {_first_line(e)})")
        if assigned:
            return self._recomputing(f"it keeps a state in module attributes its forward assigns "
                                     f"({', '.join(assigned[:2])}{', ...' if len(assigned) > 2 else ''})")  # fmt: skip
        own = [(i, type(layer).__name__) for i, layer in enumerate(probe.layers) if type(layer).__module__ != cu.__name__]
        if own:
            return self._recomputing(f"layer {own[0][0]} keeps its cache in {own[0][1]}, a cache class of the model's own "
                                     f"(transformers' cache layers have a static form the bridge passes in and out)")  # fmt: skip
        shapes = []
        for layer in probe.layers:
            found = LayerCacheShapes()
            if getattr(layer, "keys", None) is not None:
                found.kv = (layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1])
            if getattr(layer, "indexer_keys", None) is not None:
                found.indexer = layer.indexer_keys.shape[-1]
            if isinstance(layer, cu.LinearAttentionCacheLayerMixin):
                found.conv = {i: (tuple(t.shape), t.dtype) for i, t in layer.conv_states.items() if t is not None}
                found.recurrent = {i: (tuple(t.shape), t.dtype) for i, t in layer.recurrent_states.items() if t is not None}
            shapes.append(found)
        if not any(s.kv or s.conv or s.recurrent for s in shapes):
            # each decode step would see only its own token (OpenAI-GPT's had matched a tiny random
            # model's tokens by chance: with wider weights they differ from the second token on)
            return self._recomputing("it wrote nothing into transformers' cache (it has none, or keeps its state "
                                     "elsewhere: RWKV's `state` argument)")  # fmt: skip
        # One decode step as the bridge runs it, its cache column a fake number: a class that reads
        # the cache's length as a Python number (a slice bound, an ``arange`` start) cannot be traced
        # with that column as a program input.
        self._cache_shapes = shapes
        try:
            _meta_call(self, lambda: ((ids(),), {"kv_cache": self.init_kv_cache(1, 2), "cache_position": torch.ones(1, dtype=torch.long)}))
        except (DataDependentOutputException, DynamicOutputShapeException) as e:
            return self._recomputing(f"it reads the cache's length as a Python number ({type(e).__name__}: {_first_line(e)})")
        except Exception:  # noqa: BLE001 - a limit of fake tensors (none of 159 types met one): decoded over the cache
            pass
        finally:
            self._cache_shapes = None
        return shapes, None

    def _recomputing(self, why: str) -> tuple[list[LayerCacheShapes], str]:
        """([], why) when the class runs a whole sequence without a cache (on fake tensors); refused
        otherwise, with both reasons."""
        try:
            _meta_call(self.hf, lambda: ((), {"input_ids": torch.zeros(1, 2, dtype=torch.long), "use_cache": False}))
        except Exception as e:  # noqa: BLE001 - the class's own reason, in one line
            raise UnsupportedArchitecture(f"model type {self.config.model_type!r} cannot decode over a cache passed in and "
                                          f"out ({why}), and did not run without one either ({type(e).__name__}: "
                                          f"{_first_line(e)})") from e  # fmt: skip
        return [], why

    def kv_layout(self) -> tuple[list[int], list[int], list[int]]:
        """(kv heads, key dim, value dim) of each layer that keeps keys and values."""
        kv = [s.kv for s in self.cache_shapes() if s.kv]
        return [k[0] for k in kv], [k[1] for k in kv], [k[2] for k in kv]

    def _wrap(self, kv_cache: KVCache, start: torch.Tensor, continue_state: bool):
        """transformers' cache layers around the tensors passed in: a ``StaticLayer`` per KV pair (a
        ``StaticIndexedLayer`` when indexer keys come with it), a ``LinearAttentionLayer`` (or its
        hybrid with a static layer) per ``StateCache``, whose ``has_previous_state`` picks the layer's decode path (``continue_state``) or its prefill."""
        from transformers import cache_utils as cu

        layers = []
        for entry, shapes in zip(kv_cache, self.cache_shapes()):
            kv = entry.kv if isinstance(entry, StateCache) else entry
            states = isinstance(entry, StateCache) and bool(entry.conv or entry.recurrent)
            if not (kv or states):  # a layer that reads another layer's cache
                layers.append(cu.DummyLayer())
                continue
            if states:
                cls = cu.LinearAttentionAndStaticFullAttentionLayer if kv else cu.LinearAttentionLayer
            else:
                cls = cu.StaticIndexedLayer if len(kv) > 2 else cu.StaticLayer
            layer = cls.__new__(cls)
            if states:
                cu.LinearAttentionLayer.__init__(layer, number_of_states=max([*shapes.conv, *shapes.recurrent]) + 1)
                for i, t in zip(shapes.conv, entry.conv):
                    layer.conv_states[i], layer.is_conv_states_initialized[i] = t, True
                    layer.conv_kernel_size[i] = t.shape[-1]
                for i, t in zip(shapes.recurrent, entry.recurrent):
                    layer.recurrent_states[i], layer.is_recurrent_states_initialized[i] = t, True
                for i in layer.has_previous_state:
                    layer.has_previous_state[i] = continue_state
                first = (entry.conv or entry.recurrent)[0]
                layer.dtype, layer.device = first.dtype, first.device
            if kv:  # [batch, heads, seq, dim], or stacked: [layers, batch, heads, seq, dim]
                keys, values, *indexer = kv
                layer.max_cache_len = keys.shape[-2]
                layer.dtype, layer.device = keys.dtype, keys.device
                layer.batch_size, layer.num_heads = keys.shape[-4:-2]
                layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
                layer.keys, layer.values = keys, values
                layer.cumulative_length = start + 0  # its own tensor: update() advances it in place
                layer.is_initialized = True
                if indexer:  # a sparse-attention indexer's keys: written at the same columns as the keys
                    layer.indexer_keys, layer.indexer_position_ids = indexer[0], None
                    layer.indexer_dtype, layer.indexer_device = indexer[0].dtype, indexer[0].device
                    layer.indexer_cumulative_length = start + 0
                    layer.is_indexer_initialized = True
            layers.append(layer)
        return cu.Cache(layers=layers)


# How transformers' experts modules are called (``integrations.moe``).
EXPERTS_SIGNATURE = ["hidden_states", "top_k_index", "top_k_weights"]

# Fused projections and the parts they stack on their output dim, in order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "c_attn": ("q_proj", "k_proj", "v_proj"),
         "gate_up_proj": ("gate_proj", "up_proj")}  # fmt: skip


def _is_dense(module: nn.Module) -> bool:
    """An ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2: weight stored ``[in, out]``)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class FusedAsParts(nn.Module):
    """A fused projection computed as its parts: ``cat([part(x) for part], -1)`` equals the fused
    matmul exactly (the same dot products)."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.children()], dim=-1)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _cache_length(kv_cache: KVCache) -> Optional[int]:
    """Columns of the cache's first KV pair, None when no layer keeps keys and values."""
    for entry in kv_cache:
        kv = entry.kv if isinstance(entry, StateCache) else entry
        if kv:
            return kv[0].shape[-2]
    return None


def _cache_argument(hf_model: nn.Module) -> str:
    """The keyword the class takes its cache by: ``past_key_values``, or Mamba-style ``cache_params``."""
    return "cache_params" if "cache_params" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def _unwrap(layer, shapes: LayerCacheShapes):
    """A cache layer's tensors after the call, in the form the step was given them."""
    kv = (layer.keys, layer.values) if shapes.kv else ()
    if shapes.indexer:
        kv += (layer.indexer_keys,)
    if not shapes.has_state:
        return kv
    return StateCache(tuple(layer.conv_states[i] for i in shapes.conv), tuple(layer.recurrent_states[i] for i in shapes.recurrent), kv)


def _decoder_stack_path(model: nn.Module) -> str:
    """The dotted path of the model's decoder-layer ``ModuleList`` (the longest one)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return ""
    n = getattr(model.config.get_text_config(decoder=True), "num_hidden_layers", None)
    best = [x for x in lists if len(x[1]) == n] or lists
    return max(best, key=lambda x: len(x[1]))[0]


def _layer_blocks(layer: nn.Module) -> tuple[str, ...]:
    """A decoder layer's children that hold matrices (attention, MLP, experts), not norms."""
    return tuple(name for name, child in layer.named_children() if any(p.ndim >= 2 for p in child.parameters()))


def _experts_modules(hf_model: nn.Module) -> list[nn.Module]:
    return [m for m in hf_model.modules() if list(inspect.signature(m.forward).parameters)[:3] == EXPERTS_SIGNATURE]


def _meta_call(module: nn.Module, inputs) -> list[str]:
    """``module`` called on ``inputs()`` (made inside the fake mode: ``(args, kwargs)``) with every
    parameter and buffer swapped for a fake tensor (shapes only, backed by the meta device). Returns
    the module attributes the forward assigned a tensor to (RecurrentGemma keeps its recurrent state
    so), each put back as it was: a fake tensor left in the module had failed the lift."""
    from torch.func import functional_call

    # Non-persistent buffers too (not in the state dict): a forward may replace one (GPT-J and
    # CodeGen move their sin/cos table to the input's device), and functional_call restores only
    # what it swapped in, so the model kept a meta table.
    tensors = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
    # Fake tensors, not plain meta ones: transformers takes them for a trace (``is_tracing``) and
    # skips the data-dependent shortcuts (``fast_all(padding_mask)`` is an ``.item()``) that a
    # meta tensor cannot answer (BioGPT, BigBird).
    with contextlib.ExitStack() as restore:
        assigned = restore.enter_context(_attributes_put_back(module))
        # Experts that route by ``nonzero`` cannot run on fake tensors (no sizes to give), and the
        # cache does not depend on what they return: shaped like their input.
        for m in _experts_modules(module):
            m.forward = lambda hidden_states, *args, **kwargs: torch.zeros_like(hidden_states)
            restore.callback(m.__dict__.pop, "forward")
        restore.enter_context(graph_mode())
        restore.enter_context(torch.device("meta"))
        restore.enter_context(torch.no_grad())
        mode = restore.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        state = {k: mode.from_tensor(torch.empty_like(v, device="meta")) for k, v in tensors.items()}
        args, kwargs = inputs()
        functional_call(module, state, args, kwargs, tie_weights=False, strict=False)
    return assigned


# What a forward may assign to a module attribute and the bridge puts back: a tensor (a state kept
# outside any cache) or a plain value (a flag such as RWKV's ``layers_are_rescaled``).
_PLAIN = (bool, int, float, str, type(None))


@contextlib.contextmanager
def _attributes_put_back(module: nn.Module):
    """Tensors and plain values the forward assigns to module attributes are put back as they were on
    the way out, so every traced program starts from the module as it was built: RWKV rescales its
    weights in place on its first eval call and flips a flag, which had left the decode program
    with the flag's halving and without the rescaled weights (greedy tokens differed from the 5th,
    3 layers, ``rescale_every=1``). Yields the list of the tensor attributes' names, filled then."""
    before = {name: dict(m.__dict__) for name, m in module.named_modules()}
    assigned: list[str] = []
    try:
        yield assigned
    finally:
        for name, m in module.named_modules():
            for k, v in list(m.__dict__.items()):
                if isinstance(v, (torch.Tensor, *_PLAIN)) and (k not in before[name] or before[name][k] is not v):
                    if isinstance(v, torch.Tensor):
                        assigned.append(f"{name}.{k}")
                    if k in before[name]:
                        m.__dict__[k] = before[name][k]
                    else:
                        del m.__dict__[k]
