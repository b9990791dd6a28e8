"""No compile on the second run: two caches under ``$TORCHAX_BRIDGE_CACHE`` (default
``~/.cache/torchax-bridge``, next to the converted checkpoints), both on unless
``TORCHAX_BRIDGE_NO_CACHE=1`` (or ``--no-cache``).

* ``programs/``: traced programs. Tracing a torch model through torchax and lowering it to StableHLO
  is most of a compile here (measured on SmolLM2, 1 device, chat prompt, 8 new tokens: 11.4 s cold,
  and still 5.7-5.9 s with only JAX's persistent cache, because the trace and the lowering remain).
  Each program is serialized with ``jax.export`` under a key made of everything it depends on: the
  bridge's own source (bridge/, model_torch/, sharding.py), library versions, the module's structure
  and config, every weight's shape, dtype and placement, the mesh, the arguments' shapes, dtypes
  and shardings, the program's static settings and jax's numerics flags. A hit deserializes it
  instead of tracing.
* ``xla/``: JAX's persistent compilation cache (``jax_compilation_cache_dir``), keyed by JAX itself
  on the lowered module, so the XLA compile of a program seen before is read back too.

``compile_program`` reports trace / lower / compile seconds and whether each came from a cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

NO_CACHE = "TORCHAX_BRIDGE_NO_CACHE"
_ROOT = Path(__file__).resolve().parents[1]
_xla_hits = [0]
_configured: list[str] = []
# What else a traced program may depend on, registered by the module that adds it: a function giving
# its state in this process (part of every key) and the custom-call targets an export may hold
# (``cpu_kernels``: whether its kernel is registered, so a program calling it is never read back
# where it is not).
_dependencies: list[tuple[Callable[[], str], tuple[str, ...]]] = []


def depends_on(state: Callable[[], str], custom_calls: Sequence[str] = ()) -> None:
    _dependencies.append((state, tuple(custom_calls)))


def enabled() -> bool:
    return os.environ.get(NO_CACHE, "").lower() not in ("1", "true", "yes", "on")


def directory() -> Path:
    return Path(os.environ.get("TORCHAX_BRIDGE_CACHE", Path.home() / ".cache" / "torchax-bridge"))


def _on_event(event: str, **kw) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _xla_hits[0] += 1


def enable_xla_cache() -> None:
    """Points JAX's persistent compilation cache at ``directory()/xla`` (every program, however fast
    it compiled), once per process; a no-op when caching is off."""
    if not enabled():
        return
    path = str(directory() / "xla")
    if _configured == [path]:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not _configured:
        jax.monitoring.register_event_listener(_on_event)
    _configured[:] = [path]


@functools.cache
def source_digest() -> str:
    """A hash of the code that shapes a traced program: the bridge, model_torch, sharding.py."""
    h = hashlib.sha256()
    files = sorted([*(_ROOT / "bridge").glob("*.py"), *(_ROOT / "bridge" / "kernels").glob("*.cc"),
                    *(_ROOT / "model_torch").glob("*.py"), _ROOT / "sharding.py"])
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@functools.cache
def versions() -> str:
    out = []
    for dist in ("jax", "jaxlib", "torch", "torchax", "transformers"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist}: absent")
    return ",".join(out)


def _describe(x) -> str:
    """Shape, dtype and placement of an argument leaf (a Python scalar: its value)."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        sh = getattr(x, "sharding", None)
        spec = getattr(sh, "spec", None)
        mesh = getattr(sh, "mesh", None)
        where = f"{spec}@{dict(mesh.shape) if mesh is not None else None}" if sh is not None else "?"
        return f"{tuple(x.shape)}:{x.dtype}:{where}"
    return repr(x)


def program_key(name: str, args: Sequence, context: Sequence[Any]) -> str:
    """The cache key of program ``name`` traced for ``args`` (arrays or ``ShapeDtypeStruct``s with
    shardings) in ``context`` (what else the trace depends on: the model, its placements, static
    settings)."""
    h = hashlib.sha256()
    leaves, tree = jax.tree.flatten(args)
    parts = [name, source_digest(), versions(), str(jax.config.jax_default_matmul_precision),
             str(jax.config.jax_enable_x64), jax.default_backend(), *(state() for state, _ in _dependencies), str(tree), *map(_describe, leaves),
             *map(str, context)]  # fmt: skip
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


@dataclasses.dataclass
class CompileStats:
    trace_s: float = 0.0  # tracing through torchax (or reading the traced program back)
    lower_s: float = 0.0
    compile_s: float = 0.0
    programs: int = 0
    traced_from_cache: int = 0  # programs read back from programs/
    compiled_from_cache: int = 0  # XLA compiles read back from xla/

    @property
    def total_s(self) -> float:
        return self.trace_s + self.lower_s + self.compile_s

    def add(self, other: "CompileStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def describe(self) -> str:
        if not self.programs:
            return "nothing new to compile"
        hit = lambda n: "cached" if n == self.programs else f"{n}/{self.programs} cached" if n else "new"  # noqa: E731
        return (f"trace {self.trace_s:.2f} s ({hit(self.traced_from_cache)}), lower {self.lower_s:.2f} s, "
                f"compile {self.compile_s:.2f} s ({hit(self.compiled_from_cache)})")  # fmt: skip


def compile_program(name: str, fn: Callable, args: Sequence, *, donate: tuple = (), context: Sequence[Any] = ()):
    """``jax.jit(fn, donate_argnums=donate)`` compiled for ``args``, through the caches when they
    are on -> (compiled, CompileStats). ``context`` must name everything ``fn``'s trace depends on
    besides the arguments' shapes, dtypes and shardings."""
    stats = CompileStats(programs=1)
    hits = _xla_hits[0]
    if not enabled():
        t0 = time.perf_counter()
        traced = jax.jit(fn, donate_argnums=donate).trace(*args)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        compiled = lowered.compile()
        stats.trace_s, stats.lower_s, stats.compile_s = t1 - t0, t2 - t1, time.perf_counter() - t2
        return compiled, stats
    enable_xla_cache()
    path = directory() / "programs" / f"{name.replace('/', '_')}-{program_key(name, args, context)}.jaxexport"
    t0 = time.perf_counter()
    exported = None
    if path.is_file():
        try:
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
            stats.traced_from_cache = 1
        except Exception:  # noqa: BLE001 - an unreadable entry (another version's format) is traced anew
            exported = None
    if exported is None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), args)
        # Our own custom calls are allowed: the key says whether they are registered.
        allow = [jax.export.DisabledSafetyCheck.custom_call(t) for _, targets in _dependencies for t in targets]
        exported = jax.export.export(jax.jit(fn, donate_argnums=donate), disabled_checks=allow)(*abstract)
        from bridge.files import atomic_write

        with atomic_write(path, "wb") as fh:
            fh.write(exported.serialize())
    t1 = time.perf_counter()
    lowered = jax.jit(exported.call, donate_argnums=donate).lower(*args)
    t2 = time.perf_counter()
    compiled = lowered.compile()
    stats.trace_s, stats.lower_s, stats.compile_s = t1 - t0, t2 - t1, time.perf_counter() - t2
    stats.compiled_from_cache = int(_xla_hits[0] > hits)
    return compiled, stats
