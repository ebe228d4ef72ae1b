"""Giving freed CPU memory back to the operating system (``run.release_memory``).

A training step allocates its activations in the forward pass and frees them in the backward
pass, then the optimizer allocates its moments; the next step allocates new activations. With
glibc's defaults the process keeps much of that freed memory: a block above the *mmap threshold*
(128 KiB at start) gets pages of its own and goes back to the OS when freed, but the first such
free raises the threshold to that block's size (up to 32 MiB), so from then on activation-sized
blocks come from the heap, and a heap with long-lived blocks (optimizer moments, the next
batch's tensors) between freed ones cannot shrink. The resident memory (RSS, what the OS sees
and what an out-of-memory killer acts on) then grows well past what is alive.

Setting the mmap threshold explicitly turns that adjustment off (glibc's ``mallopt``), so blocks
of at least 1 MiB always get pages of their own and leave the RSS when freed; the trim
threshold at the same size returns the heap's free top too. Measured on SmolLM2-135M SFT (2 steps
of 4 HH examples, ``bench_vs_trl.py`` settings): peak RSS 4,184 → 3,706 MB at the same CPU time
(44.8 and 42.5 s, within noise; a freed 1 MiB block costs a page-fault per page when reused, which
is small beside the matmuls that fill it). Only glibc (Linux) has these knobs; elsewhere, and
where the user chose the allocator's settings (glibc's ``MALLOC_*_THRESHOLD_`` or ``GLIBC_TUNABLES``,
or jemalloc/tcmalloc through ``LD_PRELOAD``), nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_THRESHOLD.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks of at least this many bytes get pages of their own (returned to the OS when freed).
THRESHOLD = 1 << 20

_applied: str | None = None


def _user_allocator_settings() -> str | None:
    """The user's own allocator choice, which alignkit leaves alone: glibc's malloc variables or
    tunables, or another allocator preloaded (jemalloc, tcmalloc: glibc's mallopt would still
    answer, for an allocator that is not in use)."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if name in os.environ:
            return f"{name}={os.environ[name]}"
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return f"LD_PRELOAD={os.environ['LD_PRELOAD']}"
    return None


def release_freed_memory(threshold: int = THRESHOLD) -> str:
    """Make this process return freed blocks of ``threshold`` bytes or more to the OS (module
    docstring); once per process (a setting that cannot be undone). Returns a short description
    of what is in force, for the start-up line."""
    global _applied
    if _applied is not None:
        return _applied
    user = _user_allocator_settings()
    if user is not None:
        _applied = f"allocator as set by {user}"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _applied = "allocator defaults (not glibc)"
    else:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, threshold) == 1
        _applied = (f"freed blocks >= {threshold >> 20} MiB returned to the OS" if ok
                    else "allocator defaults (mallopt refused)")
    return _applied


def memory_setting(release: bool) -> str:
    """What the start-up line says for ``run.release_memory``: applied when asked; when not asked,
    whether an earlier run in this process already applied it (it stays in force)."""
    if release:
        return release_freed_memory()
    if _applied is not None and _applied.startswith("freed blocks"):
        return f"{_applied} (set by an earlier run in this process: run.release_memory=false cannot undo it)"
    return "allocator defaults (run.release_memory=false)"
