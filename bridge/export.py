"""Export: a lifted module's jitted programs serialized with ``jax.export`` (StableHLO), with its
weights as safetensors, into one directory that ``bridge.exported`` runs with JAX alone (no torch,
no torchax).

    export_module(lifted, (images,), {}, "out/")          # any module: its forward
    export_causal_lm(lm, "out/", prompt_len=64)           # a causal LM: forward, prefill, decode step

Layout of the directory (written to a temporary sibling, then renamed):
  ``manifest.json``       what the programs are, the mesh (axis names and sizes), each weight's
                          partition spec, and for a causal LM the prompt/cache lengths and EOS ids;
  ``weights.safetensors`` the weights, whole (each process places its slices when loading);
  ``<program>.jaxexport`` each program, ``Exported.serialize()`` bytes.
A sharded program stays sharded: it is exported for the mesh it was lifted on, and the loader needs
as many devices.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import sharding
from bridge import cpu_kernels
from bridge.files import atomic_directory
from bridge.lift import Lifted, LiftedModule
from bridge.prompts import cache_length

FORMAT = 1


def spec_to_json(spec: P) -> list:
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def _abstract(tree):
    """``ShapeDtypeStruct``s (with shardings) of placed arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _write(out, lifted: LiftedModule, programs: dict, manifest: dict) -> Path:
    """Writes the weights, the serialized programs and the manifest into ``out`` atomically."""
    from safetensors.flax import save_file

    from bridge.files import check_output

    out = check_output(out, "export destination", kind="dir")
    manifest = {
        "format": FORMAT,
        "mesh": dict(lifted.mesh.shape),
        "weights": {k: spec_to_json(p.spec) for k, p in lifted.placements.items()},
        "programs": {name: f"{name}.jaxexport" for name in programs},
        "jax_version": jax.__version__,
        **manifest,
    }
    with atomic_directory(out) as tmp:
        host = {k: jnp.asarray(sharding.to_host(v)) for k, v in lifted.weights.items()}
        save_file(host, str(tmp.path / "weights.safetensors"))
        del host
        for name, exp in programs.items():
            (tmp.path / f"{name}.jaxexport").write_bytes(exp.serialize())
        (tmp.path / "manifest.json").write_text(json.dumps(manifest, indent=2))
        tmp.commit()
    return out


def export_module(lifted: LiftedModule, args=(), kwargs=None, out="exported") -> Path:
    """Exports ``lifted``'s forward for the shapes of ``args``/``kwargs`` (tensor inputs; other
    values are baked in as the static arguments they are)."""
    from bridge.extract import plain_outputs

    call, arrays = lifted.jitted(tuple(args), dict(kwargs or {}))
    classes = {}  # a transformers ModelOutput leaves as a dict (the runner needs no transformers)
    exp = jax.export.export(jax.jit(lambda w, a: plain_outputs(call(w, a), classes)))(_abstract(lifted.weights),
                                                                                      _abstract(arrays))  # fmt: skip
    inputs = [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in arrays]
    manifest = {"kind": "module", "inputs": inputs}
    if "" in classes:  # the forward returned a ModelOutput: a runner with transformers rebuilds it
        manifest["output_class"] = classes[""]
    return _write(out, lifted, {"forward": exp}, manifest)


def export_causal_lm(lifted: Lifted, out, *, batch: int = 1, prompt_len: int = 64, max_new_tokens: int = 64) -> Path:
    """Exports a causal LM's programs for ``batch`` prompts of at most ``prompt_len`` tokens and
    ``max_new_tokens`` new ones, greedy:
      ``forward(weights, ids [B, P]) -> logits [B, P, V]``;
      ``prefill(weights, ids, positions, key_mask, pads, limit) -> decode state`` (the first token
      sampled, the KV cache written), the same program ``Generator`` runs;
      ``decode_step(weights, state) -> state`` (one token per row; the state is donated).
    The loader left-pads prompts exactly as ``Generator`` does (``bridge.prompts``)."""
    from bridge.generate import Generator, Sampling

    if prompt_len + max_new_tokens > lifted.model.context_length:
        from bridge.errors import UsageError

        raise UsageError(f"prompt length {prompt_len} + {max_new_tokens} new tokens exceed the model context "
                         f"({lifted.model.context_length}); lower --prompt-len or --max-new-tokens")  # fmt: skip
    gen = Generator(lifted)
    greedy = Sampling()
    cache_len = cache_length(prompt_len, max_new_tokens)
    n_out = cache_length(0, max_new_tokens)
    mesh = lifted.mesh
    rows = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=lifted.input_sharding(batch, len(shape)))  # noqa: E731
    scalar = lambda shape=(): jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(mesh, P()))  # noqa: E731
    w = _abstract(lifted.weights)
    knobs = greedy.knobs()

    def prefill(w, ids, positions, key_mask, pads, limit):
        return gen._prefill(w, ids, positions, key_mask, pads, 0, limit, knobs, cache_len=cache_len, n_out=n_out,
                            sampling=greedy)  # fmt: skip

    def decode_step(w, state):
        return gen._decode_step(w, state, sampling=greedy)

    prefill_args = (w, rows((batch, prompt_len)), rows((batch, prompt_len)), rows((batch, cache_len)),
                    scalar((batch,)), scalar())  # fmt: skip
    prefill_jit = jax.jit(prefill)
    compiled = prefill_jit.lower(*prefill_args).compile()
    shapes = jax.eval_shape(prefill_jit, *prefill_args)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, compiled.output_shardings)
    with cpu_kernels.forbidden():  # an export runs with JAX alone: XLA's own dots only
        programs = {
            "forward": jax.export.export(jax.jit(lifted.logits_fn))(w, rows((batch, prompt_len))),
            "prefill": jax.export.export(prefill_jit)(*prefill_args),
            "decode_step": jax.export.export(jax.jit(decode_step, donate_argnums=(1,)))(w, state),
        }
    eos = sorted(int(e) for e in np.asarray(gen.eos).tolist() if e >= 0)
    manifest = {
        "kind": "causal_lm",
        "batch": batch,
        "prompt_len": prompt_len,
        "max_new_tokens": max_new_tokens,
        "cache_len": cache_len,
        "vocab_size": int(lifted.model.vocab_size),
        "pad_id": int(gen.pad_id),
        "eos_token_ids": eos,
        "source": lifted.source,
        "scheme": lifted.scheme.name,
    }
    return _write(out, lifted, programs, manifest)
