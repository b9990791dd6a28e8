"""Plain torch model definitions (no JAX here). Each model file holds a config dataclass and the module.

``MODEL_TYPES`` maps a transformers ``config.json`` ``model_type`` to (module class, config class);
``PRESETS`` maps preset names (``llama-3-8b``, ``grok-1``, ``tiny-llama``, ...) to (module class, config).
"""

from __future__ import annotations

from . import grok, llama, neox

MODEL_TYPES = {
    "llama": (llama.LlamaForCausalLM, llama.LlamaConfig),
    "mistral": (llama.LlamaForCausalLM, llama.LlamaConfig),
    "qwen2": (llama.LlamaForCausalLM, llama.LlamaConfig),
    "mixtral": (llama.LlamaForCausalLM, llama.LlamaConfig),
    "gpt_neox": (neox.GPTNeoXForCausalLM, neox.GPTNeoXConfig),
    "grok": (grok.GrokForCausalLM, grok.GrokConfig),
}

PRESETS = {
    **{name: (llama.LlamaForCausalLM, cfg) for name, cfg in llama.PRESETS.items()},
    **{name: (neox.GPTNeoXForCausalLM, cfg) for name, cfg in neox.PRESETS.items()},
    **{name: (grok.GrokForCausalLM, cfg) for name, cfg in grok.PRESETS.items()},
}


def from_preset(name: str, **overrides):
    """A freshly initialised model of a preset (build it under ``torch.device('meta')`` to skip memory)."""
    import dataclasses

    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    cls, cfg = PRESETS[name]
    return cls(dataclasses.replace(cfg, **overrides))


def config_from_hf(hf_config):
    """(module class, our config) for a transformers config, or None if no model here handles it."""
    entry = MODEL_TYPES.get(getattr(hf_config, "model_type", None))
    if entry is None:
        return None
    cls, cfg_cls = entry
    return cls, cfg_cls.from_hf(hf_config)
