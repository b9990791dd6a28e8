"""Weights on CPU devices backed by 2 MiB pages (Linux transparent huge pages).

Why (measured on the 2-core Zen 4 VM, interleaved in one process): decode streams every weight once
per step, and a 538 MB read runs at a median 33 GB/s over 2 MiB pages against 24.6 GB/s over the
default 4 KiB ones (a plain two-thread read loop, 8 rounds each). SmolLM2 fp32 decode, two
generators side by side, one with its weights collapsed: batch 1 41.0-45.3 -> 45.2-50.0 tokens/s
(faster in all 8 pairs), batch 8 by -7% to +14% (its kernel is partly compute-bound).

XLA's CPU client allocates with ``malloc``, which hands out 4 KiB pages unless the system's THP mode is
``always`` (here: ``madvise``). ``back_with_huge_pages`` marks each placed weight's 2 MiB-aligned
interior ``MADV_HUGEPAGE`` and asks the kernel to ``MADV_COLLAPSE`` it (Linux >= 6.1) now: its
contents do not change, only the page tables. 538 MB take 0.8-1.9 s and hold the process's memory
map meanwhile (beside a cached compile it took that from 0.26 s to 1.9-2.6 s), so it runs on a
background thread once the first request is done: ``HugePagesAfterFirstRequest``, which a ``Generator``
calls after each request by default (its ``after_request`` hooks). Off with ``TORCHAX_BRIDGE_HUGE_PAGES=0``; a no-op off
Linux, on other platforms than CPU, and when THP is ``never`` (``why_unavailable`` says which).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from pathlib import Path

import jax

SWITCH = "TORCHAX_BRIDGE_HUGE_PAGES"
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def why_unavailable() -> str | None:
    if os.environ.get(SWITCH, "1").lower() in ("0", "false", "no", "off"):
        return f"{SWITCH}=0"
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are Linux's; this is {sys.platform}"
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return f"{THP_MODE} is not readable"
    if "[never]" in mode:
        return "transparent huge pages are switched off on this machine ([never])"
    return None


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _host_ranges(arrays) -> list[tuple[int, int]]:
    """(start, end) of the whole 2 MiB pages inside each CPU buffer of ``arrays``."""
    ranges = []
    for a in jax.tree.leaves(arrays):
        if not isinstance(a, jax.Array):
            continue
        for shard in a.addressable_shards:
            if shard.device.platform != "cpu":
                continue
            start = shard.data.unsafe_buffer_pointer()
            lo = -(-start // HUGE_PAGE) * HUGE_PAGE
            hi = (start + shard.data.nbytes) // HUGE_PAGE * HUGE_PAGE
            if hi > lo:
                ranges.append((lo, hi))
    return ranges


def back_with_huge_pages(arrays, background: bool = False, refusals: list | None = None) -> int | threading.Thread | None:
    """Backs the CPU buffers of ``arrays`` (any pytree of jax arrays) with 2 MiB pages where the
    system allows. Returns the bytes collapsed, or with ``background`` the thread doing it (it holds
    the arrays until done, so none is freed under it); None when unavailable. ``refusals`` (a list)
    collects (advice, errno) for each range the kernel refused: collapsing is a best effort (EAGAIN /
    ENOMEM when memory is too fragmented for free 2 MiB pages at that moment; EINVAL, seen 1 run in
    7 here, when the process's mappings changed under it, as XLA allocates on other threads)."""
    refusals = [] if refusals is None else refusals
    if why_unavailable() is not None:
        return None
    ranges = _host_ranges(arrays)
    if not ranges:
        return 0

    def collapse(keep=arrays) -> int:  # ``keep``: the arrays stay alive while their pages move
        madvise, done = _madvise(), 0
        for lo, hi in ranges:
            if madvise(lo, hi - lo, MADV_HUGEPAGE) != 0:
                refusals.append(("MADV_HUGEPAGE", ctypes.get_errno()))
                continue
            # EINVAL before Linux 6.1: khugepaged collapses the marked range later, in the background.
            # EAGAIN / ENOMEM: no free 2 MiB page right now (fragmented memory); the range stays marked.
            if madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
                done += hi - lo
            else:
                refusals.append(("MADV_COLLAPSE", ctypes.get_errno()))
        return done

    if not background:
        return collapse()
    thread = threading.Thread(target=collapse, name="huge-pages", daemon=True)
    thread.start()
    return thread


class HugePagesAfterFirstRequest:
    """An after-request hook: the first call backs ``arrays`` with huge pages on a background thread
    (after the first request's compile, not beside it); later calls do nothing. ``state``: None
    before the first call, then what ``back_with_huge_pages`` returned (False: unavailable or
    nothing to move)."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.state = None
        self.refusals = []  # (advice, errno) of each range the kernel refused (``back_with_huge_pages``)

    def __call__(self, *_):
        if self.state is None:
            self.state = back_with_huge_pages(self.arrays, background=True, refusals=self.refusals) or False
            self.arrays = None  # the thread holds them while it works; this hook need not
