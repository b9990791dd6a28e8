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
  ``experts_implementation="batched_mm"`` is used instead. Attention runs ``sdpa`` (the bridge
  installs a lowering with a finite mask value and grouped kv heads) where the class offers it, its
  own ``eager`` attention elsewhere (GPT-J, GPT-Neo, BLOOM, ...) and for Gemma2's soft-capping.
* ``ModelOutput`` is not a pytree: the adapter returns plain tensors.

Architectures whose layers are not attention over a kv cache (linear attention, hybrid, encoder-
decoder) are refused with one clear error.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .contract import CausalLMContract, HeadLayout, KVCache

# The context of a model with no position limit (ALiBi), as the generator enforces it.
NO_FIXED_CONTEXT = 16384

# Cache layer types this adapter runs (everything else: refused, with the reason).
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


class UnsupportedArchitecture(ValueError):
    """The model's layers cannot run as attention over a functional KV cache."""


def check_architecture(config) -> None:
    """Raises UnsupportedArchitecture naming the model type and why, or returns."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitecture(f"model type {model_type!r} is an encoder-decoder; only decoder-only causal LMs run here")
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    other = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
    if other:
        raise UnsupportedArchitecture(
            f"model type {model_type!r} has {', '.join(other)} layers (linear-attention or hybrid state, not a "
            f"key/value cache); only attention layers run through the functional KV cache"
        )


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
        self._kv_layout = None

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
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
            return out.logits, None
        if cache_position is None:
            cache_position = torch.arange(input_ids.shape[1], device=input_ids.device)
        cache = self._wrap(kv_cache, cache_position[0])
        # Columns past the end of this call hold nothing yet: hidden whatever the mask says (a causal
        # model's own mask hides them too; a bidirectional one, BERT-style with is_decoder=False,
        # would attend to the empty columns). The cache length is the keys' second-to-last dim,
        # whatever the layout (a stacked cache has a leading layer dim).
        cols = torch.arange(kv_cache[0][0].shape[-2], device=input_ids.device)
        written = (cols <= cache_position[-1]).to(torch.long)[None]
        attention_mask = written.expand(input_ids.shape[0], -1) if attention_mask is None else attention_mask * written
        if positions is None:
            positions = cache_position[None].expand(input_ids.shape[0], -1)
        out = self.hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits, [(layer.keys, layer.values) for layer in cache.layers]

    def init_kv_cache(self, batch: int, max_seq: int, dtype=None, device=None) -> KVCache:
        heads, k_dim, v_dim = self.kv_layout()
        dtype = dtype or self.dtype
        return [
            (torch.zeros(batch, h, max_seq, kd, dtype=dtype, device=device),
             torch.zeros(batch, h, max_seq, vd, dtype=dtype, device=device))
            for h, kd, vd in zip(heads, k_dim, v_dim)
        ]  # fmt: skip

    @property
    def kv_cache_heads(self) -> int:
        return self.kv_layout()[0][0]

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

    def split_fused_projections(self) -> None:
        """Phi-3's ``qkv_proj`` / ``gate_up_proj`` and GPT-2's Conv1D ``c_attn`` stack [Q;K;V] or
        [gate;up] on their output dim, so a dim-0 split would hand one device all of Q and another
        K and V. Each becomes ``FusedAsParts``: separate Linears (``q_proj``, ``k_proj``, ...)
        whose outputs are concatenated; each part splits by heads, and XLA folds the model's own
        slicing of the concatenation back onto the parts (no collective). Idempotent."""
        text = self.text_config
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        for name, module in list(self.hf.named_modules()):
            parent_name, _, leaf = name.rpartition(".")
            if leaf not in FUSED or not _is_dense(module):
                continue
            weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()  # [out, in]
            out = weight.shape[0]
            sizes = [heads * head_dim, kv * head_dim, kv * head_dim] if len(FUSED[leaf]) == 3 else [out // 2] * 2
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
    def kv_layout(self) -> tuple[list[int], list[int], list[int]]:
        """(kv heads, key dim, value dim) per layer, read off one forward on fake tensors (no memory,
        no data): every family names these config fields its own way; its cache update does not."""
        if self._kv_layout is None:
            from transformers.cache_utils import DynamicCache

            probe = DynamicCache(config=self.config)
            with torch.device("meta"), torch.no_grad():
                ids = torch.zeros(1, 1, dtype=torch.long, device="meta")
                _meta_call(self.hf, ids, probe)
            self._kv_layout = (
                [layer.keys.shape[1] for layer in probe.layers],
                [layer.keys.shape[-1] for layer in probe.layers],
                [layer.values.shape[-1] for layer in probe.layers],
            )
        return self._kv_layout

    def _wrap(self, kv_cache: KVCache, start: torch.Tensor):
        from transformers.cache_utils import Cache, StaticLayer

        layers = []
        for keys, values in kv_cache:  # [batch, heads, seq, dim], or stacked: [layers, batch, heads, seq, dim]
            layer = StaticLayer.__new__(StaticLayer)
            layer.max_cache_len = keys.shape[-2]
            layer.dtype, layer.device = keys.dtype, keys.device
            layer.batch_size, layer.num_heads = keys.shape[-4:-2]
            layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
            layer.keys, layer.values = keys, values
            layer.cumulative_length = start + 0  # its own tensor: update() advances it in place
            layer.is_initialized = True
            layers.append(layer)
        return Cache(layers=layers)


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


def _meta_call(hf_model: nn.Module, ids: torch.Tensor, cache) -> None:
    """One token through ``hf_model`` with every parameter and buffer swapped for a fake tensor (shapes
    only, backed by the meta device)."""
    from torch.func import functional_call

    # Non-persistent buffers too (not in the state dict): a forward may replace one (GPT-J and
    # CodeGen move their sin/cos table to the input's device), and functional_call restores only
    # what it swapped in, so the model kept a meta table.
    tensors = {**dict(hf_model.named_parameters(remove_duplicate=False)), **dict(hf_model.named_buffers(remove_duplicate=False))}
    # Fake tensors, not plain meta ones: transformers takes them for a trace (``is_tracing``) and
    # skips the data-dependent shortcuts (``fast_all(padding_mask)`` is an ``.item()``) that a
    # meta tensor cannot answer (BioGPT, BigBird).
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        state = {k: mode.from_tensor(torch.empty_like(v, device="meta")) for k, v in tensors.items()}
        functional_call(hf_model, state, (), dict(input_ids=mode.from_tensor(ids), past_key_values=cache, use_cache=True),
                        tie_weights=False, strict=False)  # fmt: skip
