"""Our own JAX lowerings for a few torch functions, installed into torchax's environment.

torchax lowers ``F.linear`` as ``jnp.einsum("...a,ba->...b", x, w)``. For one token (decode), XLA:CPU
turns that into a single-threaded Eigen matrix-vector call that reads weights at ~17 GB/s on this
machine. Written as ``x @ w.T`` the same product becomes a loop fusion that XLA splits across the
cores (~24-31 GB/s): SmolLM2 decode goes from ~31 to ~43 tokens/s (``benchmarks/decode.py``).

One more step is needed for that fusion to be fast: XLA fuses the cheap elementwise ops that produce
``x`` (the RMSNorm scale, SiLU(gate) * up, the attention combine) into the matrix-vector loop, which
then recomputes them once per output row. A reduction is never fused into a consumer that reuses its
elements, so a one-token input is first materialised by a sum over a stacked zero (exact: ``x + 0``).

Batched decode (2-16 rows) on CPU devices goes to ``cpu_kernels.small_batch_matmul`` instead of
XLA's GEMM (see there: 8 rows stream weights at 22-24 GB/s against 9-12); on a mesh of several
devices each runs it on its own shards.

Numerics are unchanged: the same fp32 products and sums (parity tests hold at 1e-4 and greedy
tokens equal HF's). ``install`` is idempotent and runs from ``bridge.extract.torchax_with_lowerings``, so every
torchax user in the bridge lowers the same way (the torchax shim only makes torchax importable).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from bridge import cpu_kernels, quantize  # noqa: F401  (quantize defines torch.ops.torchax_bridge.int8_linear)

_installed: set[int] = set()


def materialized(x: jnp.ndarray) -> jnp.ndarray:
    """``x`` computed once into its own buffer (see the module docstring)."""
    return jnp.stack([x, jnp.zeros_like(x)]).sum(0)


# The number of devices of the program being traced (``Lifted`` programs set it: ``on_mesh``).
_mesh_size = contextvars.ContextVar("lowerings_mesh_size", default=0)


@contextlib.contextmanager
def on_mesh(size: int):
    """Products traced inside belong to a program over ``size`` devices."""
    token = _mesh_size.set(size)
    try:
        yield
    finally:
        _mesh_size.reset(token)


# XLA:CPU computes a product with 16-bit or int8 weights over several rows by converting the whole
# weight to f32 first (a temporary of twice or four times its bytes). One device's product with such
# a weight and more rows than the kernel takes is computed tile by tile: each tile converted after
# the previous tile's product, so one tile is the copy (Llama-3-8B-shaped bf16 forward of 64 tokens:
# `plan` temporaries 0.07 GiB for 15 GiB of weights, AVX2 Zen 3). The one-row case is the kernel's
# (``cpu_kernels.ONE_ROW_MIN_K``).
TILE_BYTES = 64 << 20


def _low_precision(weight) -> bool:
    return weight.dtype in (jnp.bfloat16, jnp.float16, jnp.int8)


def tiled_product(x: jnp.ndarray, weight: jnp.ndarray, dtype) -> jnp.ndarray:
    """``x @ weight.T`` with ``weight`` converted to ``dtype`` one tile of rows at a time (at most
    ``TILE_BYTES`` converted), each tile ordered after the product before it."""
    out, inn = weight.shape
    rows = max(1, TILE_BYTES // (inn * jnp.dtype(jnp.float32).itemsize))
    pieces, after = [], x
    for a in range(0, out, rows):
        (tile,) = ordered_after([weight[a : a + rows]], after)
        y = jnp.dot(x, tile.astype(dtype).T, preferred_element_type=jnp.float32)
        pieces.append(y)
        after = y
    return jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]


def _product(x: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
    """``x @ weight.T`` in ``x``'s dtype for a weight of any dtype (int8: unscaled)."""
    rows = math.prod(x.shape[:-1])
    if cpu_kernels.active() and cpu_kernels.takes(x, weight):  # batched decode on CPU devices
        return cpu_kernels.small_batch_matmul(x, weight)
    if rows > 1 and _low_precision(weight) and _mesh_size.get() == 1 and jax.default_backend() == "cpu":
        compute = jnp.float32 if weight.dtype == jnp.int8 or x.dtype == jnp.float32 else x.dtype
        return tiled_product(x, weight, compute).astype(x.dtype)
    if weight.dtype == jnp.int8:
        # On CPU in f32, whatever ``x``'s dtype: XLA:CPU fuses the int8 -> f32 conversion into its
        # matrix-vector loop, but with bf16 rows it converted every int8 weight to bf16 in memory
        # and then to f32 (SmolLM2 int8 over bf16, batch 1: 6.4 -> 107-122 tokens/s; Zen 3, AVX2).
        # Accelerators multiply in ``x``'s dtype.
        compute = jnp.float32 if jax.default_backend() == "cpu" else x.dtype
        return (x.astype(compute) @ weight.astype(compute).T).astype(x.dtype)
    if weight.dtype == jnp.bfloat16:
        return jnp.dot(x, weight.T, preferred_element_type=jnp.float32).astype(x.dtype)
    return x @ weight.T


def linear(x: jnp.ndarray, weight: jnp.ndarray, bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """``F.linear``: ``x @ weight.T + bias`` with weight ``[out, in]``."""
    if math.prod(x.shape[:-1]) == 1:  # one token: a matrix-vector product (decode)
        x = materialized(x)
    y = _product(x, weight)
    return y if bias is None else y + bias


def ordered_after(values: list, first: jnp.ndarray) -> list:
    """``values`` with a data path from ``first``, so XLA orders their use after it. Not an
    ``optimization_barrier``: XLA:CPU drops those before its copy insertion, where the order
    matters. ``min(|x|, 0)`` is an exact 0 for every finite or infinite ``x`` and XLA does not fold
    it away."""
    zero = jnp.minimum(jnp.abs(first.ravel()[0]), 0)
    return [v + zero.astype(v.dtype) for v in values]


def int8_linear(x: jnp.ndarray, weight: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """``bridge.quantize.int8_linear``: ``(x @ weight^T) * scale``. Batched decode on one CPU
    device reads the int8 weight in the small-batch kernel; a longer input on one CPU device
    converts it tile by tile (``tiled_product``); otherwise XLA fuses the conversion into its
    matrix-vector loop (1 row) or its GEMM."""
    if math.prod(x.shape[:-1]) == 1:
        x = materialized(x)
    return _product(x, weight) * scale.astype(x.dtype)


# Finite: a fully masked row (a left-padding query) gets a uniform softmax instead of torchax's
# -inf -> NaN, which would poison the cache entries written for padding.
MASKED = -1e30
# Queries per attention block in a long prefill (see ``sdpa``).
QUERY_CHUNK = 1024


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` (eval: no dropout) for q ``[B, Hq, T, D]`` over k/v
    ``[B, Hkv, S, D]``: query heads grouped under their kv head by a reshape (kv heads never
    repeated), fp32 scores, masked scores set to a finite ``MASKED``. torchax's reference lowering
    repeats kv heads and fills with -inf."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if t > QUERY_CHUNK:
        # A long prefill attends one block of queries at a time, so its fp32 scores are [.., 1024, S]
        # instead of [.., T, S]: an 8192-token SmolLM2 prefill otherwise passed 19 GiB of host memory
        # and did not finish in 5 minutes.
        rows = lambda m, a, z: m if m is None or m.ndim < 2 or m.shape[-2] == 1 else m[..., a:z, :]  # noqa: E731
        causal = jnp.tril(jnp.ones((t, s), bool)) if is_causal else None  # top-left, as torch
        blocks = []
        for a in range(0, t, QUERY_CHUNK):
            z = min(a + QUERY_CHUNK, t)
            mask = rows(attn_mask, a, z)
            if causal is not None:
                mask = causal[a:z] if mask is None else (mask & causal[a:z] if mask.dtype == jnp.bool_ else
                                                         jnp.where(causal[a:z], mask, MASKED))  # fmt: skip
            blocks.append(sdpa(q[:, :, a:z], k, v, mask, scale=scale))
        return jnp.concatenate(blocks, axis=2)
    grouped_q = q.reshape(b, hkv, g, t, d)
    # Decode over a KV cache (a decode step's program: ``cpu_kernels.active``), as transformers'
    # classes call it (with grouped query heads folded into the query length for one new token): the
    # bridge's cache kernels, which read only the columns some row's mask lets through (the rest are
    # not yet written).
    over_cache = cpu_kernels.active() and cpu_kernels.takes_cache(grouped_q, k)
    if over_cache:
        scores = cpu_kernels.cache_scores(grouped_q, k, _visible_columns(attn_mask, s)).astype(jnp.float32) * scale
    else:
        scores = jnp.einsum("bhgtd,bhsd->bhgts", grouped_q, k).astype(jnp.float32) * scale

    def grouped(m):  # a mask [B|1, Hq|1, T, S] -> [B|1, Hkv|1, G|1, T, S]
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        return m.reshape(m.shape[0], hkv, g, t, s) if m.shape[1] == hq and hq > 1 else m[:, :, None]

    if is_causal:
        scores = jnp.where(jnp.tril(jnp.ones((t, s), bool)), scores, MASKED)
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            scores = jnp.where(grouped(attn_mask), scores, MASKED)
        else:  # additive (0 / a large negative)
            scores = jnp.maximum(scores + grouped(attn_mask).astype(jnp.float32), MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if over_cache:  # exact: the kernel skips values past the last column with a nonzero probability
        return cpu_kernels.cache_mix(probs, v).reshape(b, hq, t, v.shape[-1])
    return jnp.einsum("bhgts,bhsd->bhgtd", probs, v).reshape(b, hq, t, v.shape[-1])


def _visible_columns(attn_mask, s: int):
    """One past the last cache column each batch row's mask lets through ([B], or one count for a
    mask shared by the rows; every column: ``s``). Per row, so that on a mesh each device reduces
    its own rows (a count over all rows gathered the mask across the data axis every layer)."""
    if attn_mask is None:
        return s
    open_ = attn_mask if attn_mask.dtype == jnp.bool_ else attn_mask > MASKED / 2
    if open_.shape[-1] != s:  # a mask broadcast over the columns: all of them
        return s
    seen = open_.reshape(open_.shape[0] if open_.ndim == 4 else 1, -1, s).any(axis=1)  # [B|1, S]
    last = jnp.where(seen.any(axis=1), s - jnp.argmax(seen[:, ::-1], axis=1), 0).astype(jnp.int32)
    return last if last.shape[0] > 1 else last[0]


def batch_norm_stats(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """``F.batch_norm`` as torch computes it: (output, new running mean, new running variance).
    In training (or without running statistics) the batch's own statistics normalise, and the
    running ones move by ``momentum`` towards the batch mean and the *unbiased* batch variance, as
    torch does (torchax's lowering uses the biased one and drops the update). Statistics in f32."""
    dims = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    xf = x.astype(jnp.float32)
    if training or running_mean is None:
        mean, var = xf.mean(dims), xf.var(dims)
    else:
        mean, var = running_mean.astype(jnp.float32), running_var.astype(jnp.float32)
    y = (xf - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32).reshape(shape)
    if bias is not None:
        y = y + bias.astype(jnp.float32).reshape(shape)
    if not training or running_mean is None:
        return y.astype(x.dtype), running_mean, running_var
    n = x.size // x.shape[1]
    new_mean = (1 - momentum) * running_mean + momentum * mean.astype(running_mean.dtype)
    new_var = (1 - momentum) * running_var + momentum * (var * n / max(n - 1, 1)).astype(running_var.dtype)
    return y.astype(x.dtype), new_mean, new_var


def embedding_bag(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                  per_sample_weights=None, include_last_offset=False, padding_idx=-1):  # fmt: skip
    """``aten::_embedding_bag``: each bag (indices from one offset to the next) summed, averaged or
    max-reduced with segment sums, so offsets may be traced values (torchax's lowering loops over
    them in Python and fails under jit). Empty bags are zeros; ``padding_idx`` entries count for
    nothing, as in torch. Returns (output, offset2bag, bag_size, max_indices)."""
    n = indices.shape[0]
    bags = offsets.shape[0] - (1 if include_last_offset else 0)
    position = jnp.arange(n)
    bag = jnp.searchsorted(offsets[:bags], position, side="right") - 1
    if include_last_offset:  # indices from the last offset on belong to no bag
        bag = jnp.where(position >= offsets[-1], bags, bag)
    keep = indices != padding_idx if padding_idx is not None and padding_idx >= 0 else jnp.ones(n, bool)
    rows = weight[indices]
    if per_sample_weights is not None:
        rows = rows * per_sample_weights[:, None].astype(rows.dtype)
    count = jax.ops.segment_sum(keep.astype(jnp.int32), bag, bags)
    if mode == 2:  # max
        out = jax.ops.segment_max(jnp.where(keep[:, None], rows, -jnp.inf), bag, bags)
        out = jnp.where(count[:, None] > 0, out, 0)
    else:
        out = jax.ops.segment_sum(jnp.where(keep[:, None], rows, 0), bag, bags)
        if mode == 1:  # mean
            out = out / jnp.maximum(count, 1)[:, None].astype(out.dtype)
    return out.astype(weight.dtype), bag, count, jnp.zeros_like(count)


def _antialias_weights(in_size: int, out_size: int, scale: float, taps: int, kernel) -> np.ndarray:
    """[out, in] resampling weights of torch's (and PIL's) antialiased resize: a filter of ``taps``
    taps stretched by the scale when downsampling, each row normalised."""
    support = taps / 2 * scale if scale >= 1.0 else taps / 2
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        row = np.array([kernel((j + lo - center + 0.5) * inv) for j in range(hi - lo)])
        w[i, lo:hi] = row / row.sum() if row.sum() != 0 else row
    return w


def _cubic(x: float, a: float = -0.5) -> float:  # Keys' cubic, a = -0.5 as torch's antialiased path
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0


def _triangle(x: float) -> float:
    return max(0.0, 1.0 - abs(x))


def _resize_scale(in_size, out_size, align_corners, scale_factor):
    if align_corners:
        return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return 1.0 / scale_factor if scale_factor else in_size / out_size


def antialiased_resize(kind: str):
    """``aten::_upsample_{bicubic,bilinear}2d_aa`` (``F.interpolate(..., antialias=True)``) as two
    products with torch's separable weights (torchax's lowering of the bicubic one fails)."""
    taps, kernel = (4, _cubic) if kind == "bicubic" else (2, _triangle)

    def resize(x, output_size, align_corners, *scales):
        if len(scales) == 1:  # the .vec overload: (scale_factors)
            factors = scales[0] or (None, None)
        else:
            factors = scales + (None,) * (2 - len(scales))
        (h, w), (oh, ow) = x.shape[-2:], output_size or (int(x.shape[-2] * factors[0]), int(x.shape[-1] * factors[1]))
        rows = _antialias_weights(h, oh, _resize_scale(h, oh, align_corners, factors[0]), taps, kernel)
        cols = _antialias_weights(w, ow, _resize_scale(w, ow, align_corners, factors[1]), taps, kernel)
        compute = jnp.promote_types(x.dtype, jnp.float32)
        y = jnp.einsum("hH,...HW,wW->...hw", rows.astype(compute), x.astype(compute), cols.astype(compute))
        return y.astype(x.dtype)

    return resize


def solve_triangular(a, b, *, upper: bool, left: bool = True, unitriangular: bool = False):
    """``torch.linalg.solve_triangular`` as XLA ops: forward substitution, one row per loop step.
    torchax lowers it to LAPACK's ``trsm`` (a custom call), and a program holding that call on a mesh
    of two or more CPU devices never finished (the gated delta rule of Qwen3-Next, Qwen3.5-MoE and
    OLMo-Hybrid solves its 64-row chunks this way: prefill hung on 2 devices, ran on 1)."""
    if not left:  # x a = b  <=>  a^T x^T = b^T
        a, b, upper = jnp.swapaxes(a, -1, -2), jnp.swapaxes(b, -1, -2), not upper
    if upper:  # reversed rows and columns make an upper system lower
        a, b = a[..., ::-1, ::-1], b[..., ::-1, :]
    n, batch = a.shape[-1], jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a, b = jnp.broadcast_to(a, (*batch, n, n)), jnp.broadcast_to(b, (*batch, *b.shape[-2:]))
    cols = jnp.arange(n)

    def row(i, x):
        known = jnp.where(cols < i, jax.lax.dynamic_index_in_dim(a, i, -2, keepdims=False), 0)  # [..., n]
        xi = jax.lax.dynamic_index_in_dim(b, i, -2, keepdims=False) - jnp.einsum("...k,...kd->...d", known, x)
        if not unitriangular:
            xi = xi / jax.lax.dynamic_index_in_dim(jnp.diagonal(a, axis1=-2, axis2=-1), i, -1)
        return jax.lax.dynamic_update_index_in_dim(x, xi.astype(x.dtype), i, -2)

    x = jax.lax.fori_loop(0, n, row, jnp.zeros_like(b))
    if upper:
        x = x[..., ::-1, :]
    return jnp.swapaxes(x, -1, -2) if not left else x


# Inside an experts module that routes by index lists (``CausalLMContract.index_routed_experts``):
# ``nonzero`` and one-argument ``where`` return as many indices as the input has elements, the
# real ones first, then each dim's size (past the end: the scatter that takes the rows drops them).
# ``nonzero`` of a 1-D mask, the experts some token chose (DBRX's and LongCat-Flash's loop bound),
# answers every expert as a constant: a loop that reads each index as a number (LongCat's
# ``int(expert.item())``) runs, and an expert no token chose finds its index lists all padding.
_padded_index_lists = contextvars.ContextVar("lowerings_padded_index_lists", default=0)


def padded_nonzero(x: jnp.ndarray) -> tuple:
    return jnp.nonzero(x, size=x.size, fill_value=tuple(x.shape))


@contextlib.contextmanager
def padded_index_lists_in(modules):
    """While a trace runs inside any of ``modules``, ``nonzero`` and one-argument ``where`` give
    padded index lists (``padded_nonzero``); outside them, torchax's own."""

    evaluating = []  # constants computed while inside stay constants (jax.ensure_compile_time_eval)

    def hook(by: int):
        def move(*_):  # returns None: a value would replace the module's args or output
            _padded_index_lists.set(_padded_index_lists.get() + by)
            if by > 0:
                evaluating.append(jax.ensure_compile_time_eval())
                evaluating[-1].__enter__()
            else:
                evaluating.pop().__exit__(None, None, None)

        return move

    token = _padded_index_lists.set(0)
    handles = [h for m in modules for h in (m.register_forward_pre_hook(hook(1)), m.register_forward_hook(hook(-1)))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while evaluating:  # a forward that raised inside a module never reached its closing hook
            evaluating.pop().__exit__(None, None, None)
        _padded_index_lists.reset(token)


def install(env) -> None:
    """Registers the lowerings above in a torchax ``Environment`` (once per environment)."""
    if id(env) in _installed:
        return
    from torchax.interop import call_jax

    def via_jax(lowering):  # a torch-level op definition that runs ``lowering`` on the jax arrays
        return lambda *args, **kwargs: call_jax(lowering, *args, **kwargs)

    for op, lowering in ((F.linear, linear), (F.scaled_dot_product_attention, sdpa),
                         (torch.ops.torchax_bridge.int8_linear.default, int8_linear),
                         (torch.ops.aten._embedding_bag.default, embedding_bag),
                         (torch.ops.aten._embedding_bag_forward_only.default, embedding_bag),
                         (torch.ops.aten._upsample_bicubic2d_aa.default, antialiased_resize("bicubic")),
                         (torch.ops.aten._upsample_bicubic2d_aa.vec, antialiased_resize("bicubic")),
                         (torch.ops.aten._upsample_bilinear2d_aa.default, antialiased_resize("bilinear")),
                         (torch.ops.aten._upsample_bilinear2d_aa.vec, antialiased_resize("bilinear")),
                         (torch.ops.aten.linalg_solve_triangular.default, solve_triangular)):  # fmt: skip
        env.override_op_definition(op, via_jax(lowering))

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5):  # fmt: skip
        y, mean, var = call_jax(batch_norm_stats, input, running_mean, running_var, weight, bias, training,
                                momentum, eps)  # fmt: skip
        if training and running_mean is not None:  # torch updates the buffers in place; so do we
            running_mean.copy_(mean)
            running_var.copy_(var)
        return y

    env.override_op_definition(F.batch_norm, batch_norm)

    torchax_nonzero, torchax_where = env._ops[torch.ops.aten.nonzero].func, env._ops[torch.ops.aten.where].func

    def nonzero(x, as_tuple=False):
        if not _padded_index_lists.get():
            return call_jax(torchax_nonzero, x, as_tuple)
        if x.ndim == 1:  # the experts some token chose, the bound of the loop over experts: every expert
            found = call_jax(lambda a: jnp.asarray(np.arange(a.shape[0])[:, None]), x)
            return found.unbind(-1) if as_tuple else found
        found = call_jax(lambda a: jnp.stack(padded_nonzero(a), -1), x)
        return found.unbind(-1) if as_tuple else found

    def where(condition, x=None, y=None):
        if x is None and y is None and _padded_index_lists.get():
            return call_jax(padded_nonzero, condition)
        return call_jax(torchax_where, condition, x, y)

    env.override_op_definition(torch.ops.aten.nonzero, nonzero)
    env.override_op_definition(torch.ops.aten.where, where)

    # torchax 0.0.13's copy_ reads the source's array directly, which a view (a slice not yet
    # materialised) does not have: ``state.copy_(window[..., -k:])``, how transformers' recurrent
    # layers keep their last k inputs, failed with "'View' object has no attribute '_elem'".
    from torchax.view import View

    torchax_copy = env._ops[torch.ops.aten.copy_].func

    def copy(x, y, memory_format=None):
        return torchax_copy(x, y.torch() if isinstance(y, View) else y, env=env)

    env.override_op_definition(torch.ops.aten.copy_, copy, is_view_op=True)

    # torchax 0.0.13's Tensor.type_as casts the tensor itself in place (torch returns a new one)
    # and reads the other's array directly, which a view does not have (Gemma-3n's
    # ``norm(x).type_as(hidden_states[i])`` failed): torch's own meaning, a cast to its dtype.
    from torchax.tensor import Tensor

    Tensor.type_as = lambda self, other: self.to(other.dtype)
    _installed.add(id(env))
