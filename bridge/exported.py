"""Runs a directory written by ``bridge.export`` with JAX alone: no torch, no torchax (imports here are
jax, numpy, safetensors and the numpy-only ``bridge.prompts``).

    python -m bridge.exported DIR --input-ids 1,2,3 --max-new-tokens 16     # a causal LM, greedy
    model = load("DIR"); model(x)                                            # any exported module

The mesh is rebuilt from the manifest (axis names and sizes) on the first devices jax sees, and each
weight is placed by its recorded partition spec, so a program exported sharded runs sharded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from bridge.prompts import cut_at_eos, left_pad


def _spec(entries) -> P:
    return P(*[tuple(e) if isinstance(e, list) else e for e in entries])


class Exported:
    """The programs and weights of an export directory, placed on a mesh of this process's devices."""

    def __init__(self, path, devices: Sequence | None = None):
        from safetensors import safe_open

        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        sizes = self.manifest["mesh"]
        need = math.prod(sizes.values())
        devs = list(devices) if devices is not None else jax.devices()
        if len(devs) < need:
            raise SystemExit(f"error: {self.path} was exported for {need} devices ({sizes}); this process sees "
                             f"{len(devs)}: on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={need}")  # fmt: skip
        self.mesh = jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes),
                                  devices=devs[:need])  # fmt: skip
        self.weights = {}
        with safe_open(str(self.path / "weights.safetensors"), framework="flax") as f:
            for name, spec in self.manifest["weights"].items():
                self.weights[name] = jax.device_put(f.get_tensor(name), NamedSharding(self.mesh, _spec(spec)))
        self.programs = {
            name: jax.export.deserialize(bytearray((self.path / fname).read_bytes()))
            for name, fname in self.manifest["programs"].items()
        }
        self._jitted = {}

    def call(self, name: str, *args, donate: tuple = ()):
        """Runs program ``name`` on (weights, *args), each argument placed as the program expects."""
        exp = self.programs[name]
        if name not in self._jitted:
            self._jitted[name] = jax.jit(exp.call, donate_argnums=donate)
        shardings = exp.in_shardings_jax(self.mesh)
        flat, tree = jax.tree.flatten((self.weights, *args))
        placed = [x if isinstance(x, jax.Array) and x.sharding == s else jax.device_put(x, s) if s is not None else x
                  for x, s in zip(flat, shardings)]  # fmt: skip
        return self._jitted[name](*jax.tree.unflatten(tree, placed))

    def __call__(self, *arrays):
        """The exported forward on ``arrays`` (the tensor inputs it was exported with). A forward
        that returned a transformers ``ModelOutput`` returns it again where transformers imports,
        else the dict of its fields."""
        out = self.call("forward", list(arrays))
        name = self.manifest.get("output_class")
        if name:
            try:
                import importlib

                module, _, qualname = name.partition(":")
                out = getattr(importlib.import_module(module), qualname)(**out)
            except ImportError:
                pass  # a JAX-only runner: the fields, by name
        return out


class ExportedLM(Exported):
    """An exported causal LM: ``forward(ids)`` and greedy ``generate(prompt_ids)``."""

    def forward(self, ids) -> jax.Array:
        return self.call("forward", np.asarray(ids, np.int32))

    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int | None = None) -> list[list[int]]:
        """Greedy tokens for each prompt (at most ``batch`` prompts of at most ``prompt_len`` tokens),
        stopping at EOS like ``Generator``."""
        m = self.manifest
        limit = m["max_new_tokens"] if max_new_tokens is None else max_new_tokens
        if not 1 <= limit <= m["max_new_tokens"]:
            raise SystemExit(f"error: max_new_tokens {limit}: this export has room for 1..{m['max_new_tokens']}")
        if not 1 <= len(prompt_ids) <= m["batch"] or any(not 1 <= len(p) <= m["prompt_len"] for p in prompt_ids):
            raise SystemExit(f"error: this export takes 1..{m['batch']} prompts of 1..{m['prompt_len']} tokens")
        rows = [list(p) for p in prompt_ids] + [list(prompt_ids[0])] * (m["batch"] - len(prompt_ids))
        ids, positions, key_mask, pads = left_pad(rows, m["prompt_len"], m["cache_len"], m["pad_id"])
        state = self.call("prefill", ids, positions, key_mask, pads.astype(np.int32), np.asarray(limit, np.int32))
        steps = 1
        while steps < limit and not bool(np.all(np.asarray(state["done"]))):
            state = self.call("decode_step", state, donate=(1,))
            steps += 1
        return cut_at_eos(np.asarray(state["out"]), steps, m["eos_token_ids"], len(prompt_ids))


def load(path, devices: Sequence | None = None) -> Exported:
    """The export in directory ``path``; a missing directory or one without an export raises
    ``UsageError`` naming it and how to make one."""
    from bridge.errors import UsageError

    path = Path(path)
    make = "make one with `torchax-bridge export --checkpoint C --out DIR`"
    if not path.is_dir():
        raise UsageError(f"no directory {path}; {make}")
    if not (path / "manifest.json").is_file():
        raise UsageError(f"{path} holds no export (no manifest.json); {make}")
    kind = json.loads((path / "manifest.json").read_text())["kind"]
    return (ExportedLM if kind == "causal_lm" else Exported)(path, devices)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bridge.exported", description=__doc__.splitlines()[0])
    p.add_argument("dir")
    p.add_argument("--input-ids", required=True, help="comma-separated token ids of one prompt")
    p.add_argument("--max-new-tokens", type=int, default=None)
    args = p.parse_args(argv)
    from bridge.errors import BridgeError, UsageError

    try:
        model = load(args.dir)
        if not isinstance(model, ExportedLM):
            raise UsageError("this export is not a causal LM; call it from Python: bridge.exported.load(DIR)(x)")
        try:
            ids = [int(t) for t in args.input_ids.split(",") if t.strip()]
        except ValueError:
            raise UsageError(f"--input-ids must be comma-separated integers, got {args.input_ids!r}") from None
        vocab = model.manifest.get("vocab_size")
        bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad or not ids:
            raise UsageError(f"token ids must lie in [0, {vocab}) for this export; got {bad or 'none'}")
    except BridgeError as e:
        print(f"python -m bridge.exported: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    print(json.dumps({"prompt_ids": ids, "token_ids": model.generate([ids], args.max_new_tokens)[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
