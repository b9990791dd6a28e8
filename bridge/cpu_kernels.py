"""One hand-written CPU kernel for batched decode: ``x[M, K] @ w[N, K]^T`` for 2-16 rows.

Why (measured on the 2-core Zen 4 box, 30 x [1536, 576] f32 weights streamed from memory): for 2-16
rows XLA:CPU calls a library GEMM that streams the weights at 9-12 GB/s, where its 1-row
matrix-vector loop reaches 25-28 GB/s; torch (oneDNN) and numpy reach 9 and 6 GB/s. It is not the
arithmetic (the same product on weights resident in L3 runs at 110-130 GFLOP/s): the loads of the
next weight rows start too late. ``kernels/small_batch_matmul.cc`` reads each weight row once for
all rows of ``x`` and prefetches a few KB ahead into L2: 8 rows at 22-24 GB/s, through XLA's FFI,
split over helper threads of the kernel's own (XLA's intra-op pool slept between a step's small ops
and woke too late; see ``Helpers`` in the source). It also reads bf16 weights as they are (XLA:CPU converts them to f32
first).

The kernel is one source for every CPU (GCC/Clang vector extensions at the width of the machine it
is built for; AVX-512's transpose-tree sums and AVX512-BF16's pair products behind the compiler's
macros), built on first use with the system's C++ compiler (``$CXX``, else ``g++``) against jaxlib's
FFI headers, into ``$TORCHAX_BRIDGE_CACHE/kernels`` (also with caching off; a temporary directory if
that is not writable), keyed by its source, the compiler, the CPU and jaxlib. Two builds
(``VARIANTS``): ``native`` (``-march=native``: AVX-512, AVX2+FMA, NEON, ...) and ``avx2`` (the same
with ``-mno-avx512f``, which an AVX-512 machine runs too, so its tests and benchmarks show what a
machine without AVX-512 gets; ``TORCHAX_BRIDGE_CPU_KERNELS=avx2`` selects it). The kernel applies
to programs on CPU devices (``applies``; on a mesh of several, each device runs them on its own
shards inside a ``shard_map``, see ``Placement``); anywhere else, with ``TORCHAX_BRIDGE_CPU_KERNELS=0``,
or when the build fails (``why_unavailable`` says why, e.g. no compiler), the product stays XLA's
own dot.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from bridge import compile_cache

TARGET = "torchax_bridge_small_batch_matmul"
STACKED_TARGET = "torchax_bridge_small_batch_matmul_stacked"  # w [L, N, K] and a layer index
CACHE_SCORES = "torchax_bridge_cache_scores"  # decode attention over a KV cache: q . keys
CACHE_MIX = "torchax_bridge_cache_mix"  # and probabilities . values
LAYER_SLICE = "torchax_bridge_layer_slice"  # one layer of a stacked 16-bit tensor (``layer_slice``)
_SYMBOLS = {TARGET: "small_batch_matmul", STACKED_TARGET: "small_batch_matmul_stacked",
            CACHE_SCORES: "cache_scores", CACHE_MIX: "cache_mix", LAYER_SLICE: "layer_slice"}  # fmt: skip
MAX_ROWS = 16  # the kernel's limit; past it XLA's GEMM is compute-bound anyway
MIN_ROWS = 2  # 1 row stays XLA's matrix-vector loop: 19-22 GB/s against the kernel's 17 (Zen 3, AVX2)
# ... unless the weight's rows are this long: from K = 4096 (3584 does not) XLA:CPU re-lays-out the
# whole weight on every matrix-vector call (a temporary of its f32 size: Llama-3-8B bf16 decode
# planned 28 GiB of them) and reads 0.7 GB/s (bf16) / 1.3 GB/s (f32) on [4096, 4096]; the kernel
# reads it in place at 19.5 / 27.7 GB/s (Zen 3, AVX2, one call in a jit, same run).
ONE_ROW_MIN_K = 4096
SWITCH = "TORCHAX_BRIDGE_CPU_KERNELS"  # 0: off; native (the default) or avx2: which build
SOURCE = Path(__file__).resolve().parent / "kernels" / "small_batch_matmul.cc"
FLAGS = ["-O3", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC"]
# The builds: ``native`` targets the machine it is built on (AVX-512, AVX2, NEON, ...); ``avx2`` is
# the same source for AVX2+FMA, which an AVX-512 machine runs too (so its tests cover both).
VARIANTS = ("native", "avx2")
TARGETS = tuple(f"{base}__{v}" for base in _SYMBOLS for v in VARIANTS)  # every name a program may call
_forbidden = contextvars.ContextVar("cpu_kernels_forbidden", default=False)
_active = contextvars.ContextVar("cpu_kernels_active", default=0)  # the mesh's device count
_using = contextvars.ContextVar("cpu_kernels_using", default=None)
_why: dict[str, str] = {}


def switched_on() -> bool:
    return os.environ.get(SWITCH, "1").lower() not in ("0", "false", "no", "off")


def selected() -> str:
    """The build programs use: ``using(...)`` inside, else ``$TORCHAX_BRIDGE_CPU_KERNELS`` (``avx2``
    forces the AVX2 build), else ``native``. On a CPU without AVX-512 the two are one build."""
    name = _using.get() or os.environ.get(SWITCH, "native").lower()
    name = "native" if name in ("1", "true", "yes", "on", "") else name
    if name == "avx2" and "avx512f" not in _cpu_flags():
        return "native"
    return name


@contextlib.contextmanager
def using(variant: str):
    """Programs traced inside use build ``variant`` (tests run every build the machine executes)."""
    token = _using.set(variant)
    try:
        yield
    finally:
        _using.reset(token)


def runnable_variants() -> list[str]:
    """The builds this machine executes, each once: ``native``, and ``avx2`` on an AVX-512 CPU."""
    return ["native", "avx2"] if "avx512f" in _cpu_flags() else ["native"]


def target(base: str) -> str:
    """The custom-call name of kernel ``base`` in the selected build."""
    return f"{base}__{selected()}"


@functools.cache
def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, aarch64
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    """The CPU's model name (for speed figures), as /proc/cpuinfo or the platform gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model name")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The CPU's vector ISA in a few words (what speed figures must name), whatever was built."""
    f = _cpu_flags()
    if "avx512f" in f:
        return "AVX-512" + ("+BF16" if "avx512_bf16" in f else "")
    if "avx2" in f:
        return "AVX2" + ("+FMA" if "fma" in f else "")
    if "asimd" in f or platform.machine() in ("aarch64", "arm64"):
        return "NEON"
    return platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _variant_flags(variant: str) -> list[str] | None:
    arm = platform.machine() in ("aarch64", "arm64")
    if variant == "native":
        return ["-mcpu=native"] if arm else ["-march=native"]
    if variant == "avx2" and not arm and {"avx2", "fma"} <= _cpu_flags():
        return ["-march=native", "-mno-avx512f"]
    return None


@functools.cache
def _library(variant: str = "native") -> Path | None:
    """Build ``variant`` of the kernel (built now if absent), or None with the reason in ``_why``."""
    flags = _variant_flags(variant)
    if flags is None:
        _why[variant] = f"no {variant!r} build of the kernel for this CPU ({platform.machine()}, {cpu_isa()})"
        return None
    cxx = _compiler()
    if cxx is None:
        _why[variant] = f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH; install g++ or set CXX"
        return None
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    # -march=native means this CPU: its model and flags are part of the key (a shared cache
    # directory must not hand an AVX-512 build to an AVX2 machine).
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join([cxx, *FLAGS, *flags, *version]).encode(),
                                     cpu_name().encode(), " ".join(sorted(_cpu_flags())).encode(),
                                     jax.ffi.include_dir().encode(), compile_cache.versions().encode()])).hexdigest()[:16]  # fmt: skip
    # Kept under the cache directory even with caching off: a build is an installed artifact, not a
    # cached program, and rebuilding cost every process (every CLI test) 6 s.
    where = compile_cache.directory() / "kernels"
    out = where / f"small_batch_matmul-{variant}-{key}.so"
    if out.is_file():
        return out
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError:
        where = Path(tempfile.mkdtemp(prefix="tb-kernels-"))
        out = where / out.name
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [cxx, *FLAGS, *flags, "-w", f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
        _why[variant] = f"building {SOURCE.name} failed: {first}"
        return None
    os.replace(tmp, out)  # another process building the same key writes the same bytes
    return out


@functools.cache
def _registered(variant: str) -> ctypes.CDLL | None:
    path = _library(variant)
    if path is None:
        return None
    lib = ctypes.cdll.LoadLibrary(str(path))
    for base, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(f"{base}__{variant}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    lib.kernel_isa.restype = ctypes.c_char_p
    return lib


def available(variant: str | None = None) -> bool:
    """The kernel is switched on, this CPU runs build ``variant`` (default: the selected one), and it
    is built and registered with XLA."""
    return switched_on() and _registered(variant or selected()) is not None


def why_unavailable(variant: str | None = None) -> str | None:
    if not switched_on():
        return f"{SWITCH}=0"
    variant = variant or selected()
    return None if available(variant) else _why.get(variant, f"unknown kernel build {variant!r}")


def isa(variant: str | None = None) -> str | None:
    """The vector ISA build ``variant`` was compiled for (``AVX2+FMA``, ``AVX-512+BF16``, ``NEON``), or
    None where it is unavailable."""
    lib = _registered(variant or selected()) if switched_on() else None
    return None if lib is None else lib.kernel_isa().decode()


def state() -> str:
    """What a traced program's cache key must carry: a program with the kernel needs its build registered."""
    return f"{TARGET}:{selected() + ':' + str(isa()) if available() else 'off'}"


compile_cache.depends_on(state, TARGETS)


def applies(mesh) -> bool:
    """Whether programs on ``mesh`` use the kernels: a mesh of CPU devices (one, or many: then each
    device runs the kernel on its own shards, see ``Placement``), not inside ``forbidden()``."""
    return (not _forbidden.get() and all(d.platform == "cpu" for d in mesh.devices.flat)
            and available())  # fmt: skip


def active() -> bool:
    """Whether the program being traced uses the kernel (inside ``used_on``; on a mesh of several
    devices, only where ``placed`` says where the weights and the cache live)."""
    devices = _active.get()
    return devices == 1 or (devices > 1 and _placed.get() is not None)


@contextlib.contextmanager
def used_on(mesh):
    """Products traced inside use the kernel where it ``takes`` them, if it ``applies`` to ``mesh``
    (``programs.decode_step``: batched decode; training never, the kernel has no gradient)."""
    token = _active.set(mesh.devices.size if applies(mesh) else 0)
    try:
        yield
    finally:
        _active.reset(token)


@contextlib.contextmanager
def placed(mesh, placement: "Placement"):
    """Programs traced inside run on ``mesh`` with their weights and KV cache where ``placement``
    says: on several devices the kernels run on each device's shards by it. Every lifted program is
    traced inside (``lift.lifted_fn``)."""
    on = _mesh.set(mesh)
    token = _placed.set(placement if mesh.devices.size > 1 else None)
    try:
        yield
    finally:
        _mesh.reset(on)
        _placed.reset(token)


@contextlib.contextmanager
def forbidden():
    """Programs traced inside use no kernel (an export must run with JAX alone, anywhere)."""
    token = _forbidden.set(True)
    try:
        yield
    finally:
        _forbidden.reset(token)


def takes_rows(rows: int) -> bool:
    """Whether a product of ``rows`` rows goes to the kernel (``MIN_ROWS``: see there)."""
    return MIN_ROWS <= rows <= MAX_ROWS


def takes(x: jnp.ndarray, w: jnp.ndarray) -> bool:
    """Whether ``small_batch_matmul`` computes ``x @ w.T`` for these operands."""
    rows = x.size // x.shape[-1] if x.ndim else 0
    src, _ = _in_place(w)
    # One row: XLA's matrix-vector loop, but for long rows (``ONE_ROW_MIN_K``) and for a layer of
    # a 16-bit stack, which XLA would get as a copy (SmolLM2 bf16 batch 1, scanned: 80.8 tokens/s
    # on copies, against 96.2 unrolled; avx512f).
    rows_ok = takes_rows(rows) or rows == 1 and w.ndim == 2 and (w.shape[1] >= ONE_ROW_MIN_K or
                                                                 src is not w and copies_layers(src))  # fmt: skip
    ok = (rows_ok and w.ndim == 2 and w.shape[1] == x.shape[-1]
          and x.dtype in (jnp.float32, jnp.bfloat16) and w.dtype in (jnp.float32, jnp.bfloat16, jnp.int8))  # fmt: skip
    if ok and _placed.get() is not None:  # on a mesh: a weight the bridge placed, rows it can split
        spec = weight_spec(w)
        ok = spec is not None and not any(_axes(e) for e in spec[:-2])
    return ok


# Scanned layers: the slice of a stacked weight a layer's body sees -> (stacked tensor, layer index),
# for the trace in flight (``layer_slices``).
_slices: dict[int, tuple] = {}


@contextlib.contextmanager
def layer_slices():
    """Inside, ``layer_slice`` records where its slices come from; cleared on leaving."""
    saved = dict(_slices)
    try:
        yield
    finally:
        _slices.clear()
        _slices.update(saved)


def layer_slice(stacked: jnp.ndarray, layer: jnp.ndarray, *, kv_cache: bool = False) -> jnp.ndarray:
    """``stacked[layer]``; a product with it in ``small_batch_matmul`` reads the stacked tensor in
    place instead (XLA hands a custom call a dynamic slice as a copy: every layer's weights copied
    on every step; SmolLM2 fp32 batch 8 decode, scanned: 164 tokens/s with the copies, 208 unrolled).
    A 16-bit stack on CPU devices is sliced by the kernel's layer copy (``copies_layers``).
    ``kv_cache``: ``stacked`` is the KV cache's stack (placed by the cache's spec, not a weight's)."""
    where = _layer_copy(stacked, kv_cache)
    if where is None:
        out = jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False)
    else:
        out = _copied_layer(stacked, jnp.asarray(layer, jnp.int32), where)
    _slices[id(out)] = (out, stacked, layer)
    return out


def bitwise_update_slice(a: jnp.ndarray, update: jnp.ndarray, at) -> jnp.ndarray:
    """``jax.lax.dynamic_update_slice``; a 16-bit float array is updated as its uint16 bits: XLA:CPU
    updates a bf16 array by converting all of it to f32 and back (a scanned bf16 stack's cache, 30
    layers, converted whole once per layer per step: SmolLM2 bf16 decode 45 -> 32 tokens/s, Zen 3 AVX2)."""
    if a.dtype not in (jnp.bfloat16, jnp.float16):
        return jax.lax.dynamic_update_slice(a, update, at)
    bits = jax.lax.dynamic_update_slice(jax.lax.bitcast_convert_type(a, jnp.uint16),
                                        jax.lax.bitcast_convert_type(update, jnp.uint16), at)  # fmt: skip
    return jax.lax.bitcast_convert_type(bits, a.dtype)


def copies_layers(stacked: jnp.ndarray, kv_cache: bool = False) -> bool:
    """Whether ``layer_slice`` copies one layer out of ``stacked`` with the kernel: a bf16/f16 stack
    on CPU devices. XLA:CPU has no 16-bit dynamic slice: it converts the whole stack to f32 and
    hoists that out of the scan (a scanned bf16 stack held twice its weights as temporaries, and
    decoded SmolLM2 at 19-23 tokens/s against 62-72 unrolled; slicing the bits as uint16 copies
    the whole stack once too: 31-33)."""
    return _layer_copy(stacked, kv_cache) is not None


def _layer_copy(stacked, kv_cache: bool):
    """(mesh, the stack's spec or None on one device) where the layer copy applies, else None."""
    mesh = _mesh.get()
    if (stacked.dtype not in (jnp.bfloat16, jnp.float16) or stacked.ndim < 2 or mesh is None or _forbidden.get()
            or any(d.platform != "cpu" for d in mesh.devices.flat) or not available()):  # fmt: skip
        return None
    if mesh.devices.size == 1:
        return mesh, None
    placed = _placed.get()
    if kv_cache:
        spec = _entries(placed.cache_spec(stacked.shape[1], stacked.shape[2], True), stacked.ndim)
    else:
        spec = weight_spec(stacked)
    return None if spec is None or _axes(spec[0]) else (mesh, tuple(spec))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _copied_layer(stacked, layer, where):
    mesh, spec = where

    def local(s, i):
        return _ffi(LAYER_SLICE, jax.ShapeDtypeStruct(s.shape[1:], s.dtype), s, i)

    if spec is None:
        return local(stacked, layer)
    from jax.sharding import PartitionSpec as P

    return jax.shard_map(local, mesh=mesh, in_specs=(P(*spec), P()), out_specs=P(*spec[1:]),
                         check_vma=False)(stacked, layer)  # fmt: skip


def _copied_layer_fwd(stacked, layer, where):
    return _copied_layer(stacked, layer, where), (jax.ShapeDtypeStruct(stacked.shape, stacked.dtype), layer)


def _copied_layer_bwd(where, residual, grad):
    shape, layer = residual
    return jnp.zeros(shape.shape, grad.dtype).at[layer].set(grad).astype(shape.dtype), None


_copied_layer.defvjp(_copied_layer_fwd, _copied_layer_bwd)


def _in_place(a: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(the array to hand a kernel, the layer index): a layer slice's stack, or ``a`` itself."""
    entry = _slices.get(id(a))
    if entry is not None and entry[0] is a:
        return entry[1], jnp.asarray(entry[2], jnp.int32)
    return a, jnp.zeros((), jnp.int32)


def bf16_pairs() -> bool:
    """Whether the selected build has AVX512-BF16: bf16 rows times bf16 weights then run as dot
    products of pairs (two multiply-adds per lane per instruction, no conversion). Elsewhere bf16
    rows are widened to f32 (a few rows: small) and bf16 weights in registers."""
    lib = _registered(selected()) if switched_on() else None
    return bool(lib is not None and lib.kernel_bf16_pairs())


def small_batch_matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """``x[..., K] @ w[N, K]^T`` in f32 (accumulated in f32; ``w`` f32, bf16 or int8), in ``x``'s dtype.
    bf16 rows go in as they are (with bf16 weights on AVX512-BF16 as pairs, ``bf16_pairs``; else
    widened by the kernel), other rows as f32. On a
    mesh of several devices each device multiplies its own shards (``_sharded_product``)."""
    xf = x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)  # bf16 rows are widened by the kernel
    src, layer = _in_place(w)
    stacked = src is not w  # a scanned layer's slice: the kernel reads the stack at ``layer``
    operands = (xf, src, layer) if stacked else (xf, w)
    base = STACKED_TARGET if stacked else TARGET
    placed = _placed.get()
    if placed is None:
        y = _ffi(base, _rows_shape(xf, src), *operands)
    else:
        y = _sharded_product(placed, base, operands, stacked)
    return y.astype(x.dtype)


def takes_cache(q: jnp.ndarray, cache: jnp.ndarray) -> bool:
    """Whether ``cache_scores`` / ``cache_mix`` compute decode attention over this cache: an f32 or
    bf16 cache, a few query rows per kv head (query heads per kv head x new tokens <= 16)."""
    floats = (jnp.float32, jnp.bfloat16)
    return (q.ndim == 5 and cache.ndim == 4 and q.dtype in floats and cache.dtype in floats
            and q.shape[2] * q.shape[3] <= MAX_ROWS)  # fmt: skip


def cache_scores(q: jnp.ndarray, keys: jnp.ndarray, visible) -> jnp.ndarray:
    """``einsum("bhgtd,bhsd->bhgts")``: q [B, Hkv, G, T, D] against a cache's keys [B, Hkv, S, D]
    (read in place from a stacked cache when ``keys`` is a ``layer_slice``). XLA:CPU ran these as
    YNNPACK batched dots at ~8 GB/s: with them, attention took a quarter of a batch-8 decode step.
    ``visible``: columns from there on are masked by the caller; they are not read (scores 0). One
    count, or one per batch row ([B]: each device then reads up to its own rows' largest, with no
    communication between devices)."""
    b, h, g, t, d = q.shape
    src, layer = _in_place(keys)
    visible = jnp.asarray(visible, jnp.int32)
    visible = visible if visible.ndim == 1 and visible.shape[0] == b else visible.max().reshape(())
    out = _cache_call(CACHE_SCORES, keys.shape[2], q.reshape(b, h, g * t, d).astype(jnp.float32), src, layer, visible)
    return out.reshape(b, h, g, t, keys.shape[2]).astype(q.dtype)


def cache_mix(probs: jnp.ndarray, values: jnp.ndarray) -> jnp.ndarray:
    """``einsum("bhgts,bhsd->bhgtd")``: probabilities [B, Hkv, G, T, S] times a cache's values
    (the kernel skips the values past the last column with a nonzero probability: exact)."""
    b, h, g, t, s = probs.shape
    src, layer = _in_place(values)
    out = _cache_call(CACHE_MIX, values.shape[3], probs.reshape(b, h, g * t, s).astype(jnp.float32), src, layer)
    return out.reshape(b, h, g, t, values.shape[3]).astype(probs.dtype)


# -- on a mesh of several CPU devices ----------------------------------------------------------------
# Each device runs the kernels on its own shards inside a ``jax.shard_map``: a column-parallel
# product on its rows of the weight, a row-parallel one on its columns (the partial products summed
# across the devices that split the contracted dim), attention on its batch rows and kv heads of the
# cache. Nothing moves but the few rows of activations. With XLA's own dots instead, SmolLM2 fp32
# batch 8 on 8 simulated devices (tp) decoded at 27 tokens/s against 70-76 (Zen 3, AVX2, 2 cores), and
# Llama-3-8B bf16 tp 8 planned 2.4 GiB of temporaries per device (1.3x its parameters: a bf16->f32
# copy of each weight shard). The specs come from the bridge (``placed``): the weight plan's for each
# weight, the KV cache's layout for the cache; a weight it does not name keeps XLA's dot.
@dataclasses.dataclass(frozen=True)
class Placement:
    """What the kernels need on a mesh of several devices: the mesh, each weight's spec by the
    array traced for it, the mesh axes a batch dim of a given size splits over, and the cache's spec
    for its (batch, kv heads, stacked)."""

    mesh: object
    weights: dict  # id(array) -> (array, PartitionSpec)
    batch_axes: Callable  # (dim size) -> a PartitionSpec entry (None: not split)
    cache_spec: Callable  # (batch, kv heads, stacked) -> PartitionSpec


_placed = contextvars.ContextVar("cpu_kernels_placed", default=None)
_mesh = contextvars.ContextVar("cpu_kernels_mesh", default=None)


def _entries(spec, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def weight_spec(w: jnp.ndarray):
    """The spec the bridge placed ``w``'s array by (a layer slice: its stack's), or None."""
    placed = _placed.get()
    src, _ = _in_place(w)
    entry = None if placed is None else placed.weights.get(id(src))
    return None if entry is None or entry[0] is not src else _entries(entry[1], src.ndim)


def _row_lead(placed: Placement, x: jnp.ndarray, taken: set) -> tuple:
    """The spec of ``x``'s leading dims: its first dim over the batch axes (when they divide it and
    the weight does not use them), the rest whole."""
    if x.ndim < 2:
        return ()
    batch = placed.batch_axes(x.shape[0])
    if set(_axes(batch)) & taken:
        batch = None
    return (batch,) + (None,) * (x.ndim - 2)


def _sharded_product(placed: Placement, base: str, operands: tuple, stacked: bool):
    from jax.sharding import PartitionSpec as P

    x, w = operands[0], operands[1]
    w_spec = weight_spec(w)
    n, k = w_spec[-2:]
    lead = _row_lead(placed, x, set(_axes(n)) | set(_axes(k)))
    summed = _axes(k)
    in_specs = (P(*lead, k), P(*w_spec), *([P()] if stacked else []))

    def local(*ops):
        y = _ffi(base, _rows_shape(ops[0], ops[1]), *ops)
        return jax.lax.psum(y, summed) if summed else y

    return jax.shard_map(local, mesh=placed.mesh, in_specs=in_specs, out_specs=P(*lead, n), check_vma=False)(*operands)


def _cache_call(base: str, last: int, rows: jnp.ndarray, cache: jnp.ndarray, layer, *scalars):
    """A cache kernel: rows [B, H, R, *] against a cache [(L,) B, H, S, D] -> [B, H, R, ``last``]."""
    shape = lambda r: jax.ShapeDtypeStruct((*r.shape[:3], last), jnp.float32)  # noqa: E731
    # A scalar given per batch row ([B]) is reduced to its largest where the rows are (each device's own).
    scalar = lambda x: x if x.ndim == 0 else x.max()  # noqa: E731
    placed = _placed.get()
    if placed is None:
        return _ffi(base, shape(rows), rows, cache, layer, *map(scalar, scalars))
    from jax.sharding import PartitionSpec as P

    stacked = cache.ndim == 5
    spec = _entries(placed.cache_spec(rows.shape[0], rows.shape[1], stacked), cache.ndim)
    b, h = spec[-4], spec[-3]

    def local(r, c, i, *rest):  # scores: one per cache column; mix: head_dim wide (neither is split)
        return _ffi(base, shape(r), r, c, i, *map(scalar, rest))

    in_specs = (P(b, h, None, None), P(*spec), P(), *[P(b) if x.ndim else P() for x in scalars])
    return jax.shard_map(local, mesh=placed.mesh, in_specs=in_specs, out_specs=P(b, h, None, None),
                         check_vma=False)(rows, cache, layer, *scalars)  # fmt: skip


def _rows_shape(x: jnp.ndarray, w: jnp.ndarray) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[-2]), jnp.float32)


def _ffi(base: str, shape: jax.ShapeDtypeStruct, *operands):
    return jax.ffi.ffi_call(target(base), shape)(*operands)
