"""One way to open a model: a checkpoint name in, a ``Lifted`` model on a mesh out.

    from bridge.models import open_model
    lifted = open_model("smollm2", devices=8, scheme="tp", fallback="replicate")
    Generator(lifted).generate(["What is the capital of France?"], chat=True)

``open_model`` owns the choice between the two ways of getting weights onto the mesh:
  * in place (every model_torch family: presets, HF directories of one, GPT-NeoX slim weights,
    Grok-1's ckpt-0): the model is built on the meta device and each device's slice of each tensor is
    read (or made, for a preset; quantized, for int8) straight into place
    (``lift(..., stored=checkpoints.open_stored(...))``): the full model never exists in host memory,
    and with several processes each reads only its own slices;
  * load, then lift: the torch module is built and loaded on the host (``checkpoints.load``: GGUF
    files, transformers' own classes), then lifted and placed.
The CLI, the examples and the benchmarks all open models through it.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

from bridge import checkpoints, devices as device_setup
from bridge.lift import Lifted, lift


def open_model(
    checkpoint: str = checkpoints.SMOLLM2,
    *,
    devices: int | Sequence | None = None,
    scheme="tp",
    mesh: Optional[dict] = None,
    dtype: str = "float32",
    quantize: str = "none",
    fallback: str = "error",
    with_tokenizer: bool = True,
    implementation: str = "auto",
    scan_layers: bool | None = None,
) -> Lifted:
    """Opens ``checkpoint`` (see ``checkpoints``: 'smollm2', a HF directory, a .gguf file, a preset)
    on a mesh of ``devices`` (a count, a list of jax devices, or None for all) laid out by ``scheme``
    (a name, a rules file, or a ``sharding.Scheme``) with ``mesh`` axis sizes overriding the
    scheme's. ``with_tokenizer=False`` never loads a tokenizer (token ids need none).
    ``implementation``: ``auto`` (our model_torch rewrite when the family has one, else
    transformers' own class through ``HFCausalLMAdapter``), ``model_torch`` or ``transformers``. Every input is
    checked before any weight is placed; bad input raises a ``bridge.errors.BridgeError``.
    ``scan_layers``: the decoder stack as one scan over stacked weights (``bridge.scan``); None:
    whenever the model can be (``scan.scans``)."""
    import sharding

    devs = list(devices) if isinstance(devices, (list, tuple)) else device_setup.setup(devices)
    scheme = sharding.get_scheme(scheme)  # fail on a bad scheme before loading anything
    jax_mesh = sharding.mesh_for(scheme, len(devs), mesh or {}, devs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback summary is the caller's to print, once
        kind, path = checkpoints.resolve(checkpoint)
        if checkpoints.opens_in_place(kind, path, implementation):
            model, stored, hf_config = checkpoints.open_stored(kind, path, dtype, quantize, preset=checkpoint)
            tokenizer = checkpoints.load_stored_tokenizer(kind, path) if with_tokenizer and kind != "preset" else None
        else:
            loaded = checkpoints.load(checkpoint, dtype, with_tokenizer=with_tokenizer, quantize=quantize,
                                      implementation=implementation)  # fmt: skip
            model, stored, tokenizer, hf_config = loaded.model, None, loaded.tokenizer, loaded.hf_config
        lifted = lift(model, jax_mesh, scheme, fallback=fallback, scan_layers=scan_layers, stored=stored)
        lifted.tokenizer, lifted.hf_config = tokenizer, hf_config
    lifted.source = str(path) if path is not None else checkpoint
    return lifted
