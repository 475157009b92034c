"""Give freed CPU buffers back to the operating system: glibc's mmap threshold, fixed.

glibc's ``malloc`` serves a request from its heap unless it is at least the *mmap threshold*, in which case it
maps pages of its own and unmaps them on ``free``. The threshold starts at 128 KiB but follows the largest
mapped buffer freed so far, up to 32 MiB. A training step frees many buffers of a few MiB (activations,
per-layer gradients), so after the first step they are carved out of the heap, and what is freed there stays
resident: the heap only grows. Measured on setting (a) of the benchmark (Qwen2.5-0.5B geometry, 4 layers,
fp32), the process peaked about 210 MiB higher that way than with the threshold fixed at 1 MiB.

Fixing the threshold (``mallopt(M_MMAP_THRESHOLD, n)``, which also switches the adjustment off) affects the
whole process: the command line fixes it for a run and puts it back after (:func:`threshold_restored`).
Elsewhere than Linux with glibc this does nothing.

Mapping has a price: each mapped buffer's pages are faulted in (and zeroed) again at first touch. Decoding
allocates and frees a few [rows, V] buffers at every new token (4.6 MiB each for 8 rows of Qwen2.5's
vocabulary), so :func:`heap_kept` raises the threshold above them for a rollout and gives the heap's free
pages back after it: on bench setting (a), sampling took about 1 s less a step (7.0 against 5.8–6.1 s on 2
AVX2 cores), with the same peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
# glibc refuses larger values (HEAP_MAX_SIZE / 2 on 64-bit systems)
MAX_THRESHOLD = 32 * 1024 * 1024
GLIBC_START = 128 * 1024  # the threshold glibc starts a process with (DEFAULT_MMAP_THRESHOLD_MIN)
_fixed: int | None = None  # the threshold this process fixed last, None while glibc adjusts its own


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # gnu_get_libc_version exists only in glibc: musl and others keep their own malloc
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def check_mmap_threshold(nbytes: int) -> None:
    if not 0 < nbytes <= MAX_THRESHOLD:
        raise ValueError(f"malloc_mmap_threshold must be in (0, {MAX_THRESHOLD}] bytes, got {nbytes}")


def set_mmap_threshold(nbytes: int) -> bool:
    """Have glibc map (and unmap on free) every allocation of ``nbytes`` or more; False where that cannot apply."""
    global _fixed
    check_mmap_threshold(nbytes)
    libc = _glibc()
    applied = bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    if applied:
        _fixed = int(nbytes)
    return applied


@contextmanager
def threshold_restored() -> Iterator[None]:
    """The threshold :func:`set_mmap_threshold` may fix inside the block is undone when it ends.

    What was fixed before is fixed again. Where nothing was, glibc gets its starting threshold (128 KiB) back,
    but not its own adjustment of it: glibc has no call that reads the threshold or turns that adjustment back
    on once ``mallopt`` has fixed a value, so after a run glibc maps every allocation of 128 KiB or more (as a
    fresh process does until it frees its first mapped buffer).
    """
    global _fixed
    before = _fixed
    try:
        yield
    finally:
        libc = _glibc()
        if _fixed != before and libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, GLIBC_START if before is None else before)
        _fixed = before


@contextmanager
def heap_kept(nbytes: int) -> Iterator[None]:
    """Allocations under ``nbytes`` come from the heap meanwhile; after, the fixed threshold is back and the
    heap's free pages go back to the system (``malloc_trim``), so the peak that follows does not carry them.

    Only where a threshold was fixed (:func:`set_mmap_threshold`) below ``nbytes``: glibc's own moving
    threshold keeps such buffers in the heap already.
    """
    fixed, libc = _fixed, _glibc()
    if libc is None or fixed is None or nbytes <= fixed:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, min(int(nbytes), MAX_THRESHOLD))
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, fixed)
        libc.malloc_trim(0)


def mapped_bytes() -> int | None:
    """Bytes glibc currently holds in mapped (not heap) allocations, from ``mallinfo2``; None without glibc."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    return int(libc.mallinfo2().hblkhd)
