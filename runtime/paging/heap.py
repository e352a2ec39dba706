"""Keep the memory a dropped paged-layer session frees for the next session's build.

Each paged layer's session prepacks its int4 matrices into buffers onnxruntime allocates with malloc
(several MiB each). glibc serves allocations that large with a fresh mmap and returns them with munmap
(or trims them off the top of an arena), so every build faults its prepacked buffers in page by page
again: 4 KiB faults over ~24 MiB per 1.5B layer (benchmarks/bench_paging.py prints the build time).
Raising glibc's mmap and trim thresholds keeps freed buffers in the arenas, already faulted, so the
next build reuses them.

The memory kept is bounded by what the executor's live sessions hold at once, which the ledger
already charges against the budget (PagingPlan.sessions x slot bytes). The thresholds are
process-wide; they are set when a paged executor is created and left for the process (a daemon that
pages keeps paging). Elsewhere than glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("edge_sdk.runtime")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # not glibc (musl has no tunable thresholds)
    return libc


def keep_freed_buffers(largest_buffer: int, kept_bytes: int) -> dict:
    """Serve allocations up to `largest_buffer` bytes from the arenas and keep up to `kept_bytes` free
    at an arena's top instead of returning it. Returns what was set (for describe()/bench)."""
    libc = _libc()
    if libc is None:
        return {"set": False, "reason": "not glibc"}
    mmap_threshold = int(largest_buffer) + (1 << 20)  # glibc maps requests at or above it, headers included
    trim_threshold = max(int(kept_bytes), mmap_threshold)
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(min(mmap_threshold, 2**31 - 1))))
    ok = bool(libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold, 2**31 - 1)))) and ok
    if not ok:
        log.info("glibc refused the malloc thresholds; paged layer builds fault their buffers in each time")
        return {"set": False, "reason": "mallopt refused"}
    return {"set": True, "mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}
