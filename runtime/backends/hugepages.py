"""Back the inference session's weight memory with transparent huge pages.

A decode step streams every weight once. On 4 KiB pages that is a TLB miss per 4 KiB read, and the
page walks cost a large share of memory bandwidth; 2 MiB pages remove almost all of them. Kernels
whose transparent_hugepage mode is `madvise` (the common default, Jetson's L4T included) only give
huge pages to memory that asks. This module asks for the anonymous mappings an onnxruntime session
created while it was built (its prepacked weights), and no others:

    before = anonymous_regions(); <create the session>; advise_new(before)

`MADV_HUGEPAGE` marks the regions; `MADV_COLLAPSE` (Linux 6.1+) converts them at once. Older kernels
(JetPack 6's 5.15) convert them in the background through khugepaged. Nothing here is required: where
the kernel refuses, the session runs on small pages as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("edge_sdk.runtime")

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
HUGE = 2 << 20
MIN_REGION = 4 * HUGE  # smaller mappings gain little and may be sparse
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


@dataclass
class Advice:
    regions: int = 0
    bytes: int = 0  # bytes of 2 MiB-aligned ranges advised
    collapsed: int = 0  # bytes MADV_COLLAPSE converted so far; the rest khugepaged converts later
    mode: str = "unknown"  # the kernel's transparent_hugepage mode
    reason: str = ""  # why nothing was advised
    collapsing: bool = False  # a background thread is still converting
    collapse_s: float = 0.0  # how long the conversion took, once done

    def to_dict(self) -> dict:
        out = {"advised_bytes": self.bytes, "collapsed_bytes": self.collapsed, "mode": self.mode}
        out |= {"collapsing": True} if self.collapsing else {"collapse_s": round(self.collapse_s, 3)}
        return out | ({"reason": self.reason} if self.reason else {})


def thp_mode() -> str:
    try:
        with open(THP_MODE) as f:
            text = f.read()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1: text.index("]")] if "[" in text else text.strip()


def anonymous_regions(path: str = "/proc/self/maps") -> set[tuple[int, int]]:
    """(start, end) of private, writable mappings without a backing file."""
    out = set()
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 5 or parts[1] != "rw-p" or (len(parts) > 5 and parts[5] != "[heap]"):
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.add((start, end))
    except OSError:
        pass
    return out


def huge_ranges(regions, min_bytes: int = MIN_REGION) -> list[tuple[int, int]]:
    """The 2 MiB-aligned part of every region of at least `min_bytes`."""
    out = []
    for start, end in sorted(regions):
        if end - start < min_bytes:
            continue
        a, b = -(-start // HUGE) * HUGE, end // HUGE * HUGE
        if b > a:
            out.append((a, b))
    return out


def advise_new(before: set[tuple[int, int]], background: bool = False) -> Advice:
    """Ask for huge pages on the anonymous mappings that appeared since `before`. With `background`,
    the conversion (MADV_COLLAPSE copies the pages, seconds for a model: docs/runtime.md "Huge pages") runs on a daemon thread and the
    caller goes on at once; `collapsed` grows as it proceeds."""
    mode = thp_mode()
    if mode in ("never", "unavailable") or not hasattr(os, "sysconf"):
        return Advice(mode=mode, reason=f"transparent huge pages are {mode}")
    ranges = huge_ranges(anonymous_regions() - before)
    if not ranges:
        return Advice(mode=mode, reason="no new mapping large enough")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = [(a, b) for a, b in ranges if libc.madvise(a, b - a, MADV_HUGEPAGE) == 0]
    if not advised:
        return Advice(mode=mode, reason=f"madvise refused (errno {ctypes.get_errno()})")
    advice = Advice(len(ranges), sum(b - a for a, b in advised), 0, mode, collapsing=True)

    def collapse():
        # huge pages now (Linux 6.1+); where it fails (older kernels, no free huge page), khugepaged
        # converts them later. ctypes releases the GIL for the call.
        start = time.perf_counter()
        for a, b in advised:
            if libc.madvise(a, b - a, MADV_COLLAPSE) == 0:
                advice.collapsed += b - a
        advice.collapse_s = time.perf_counter() - start
        advice.collapsing = False

    if background:
        threading.Thread(target=collapse, name="edge-sdk-hugepages", daemon=True).start()
    else:
        collapse()
    return advice


def anon_huge_bytes(path: str = "/proc/self/smaps_rollup") -> int:
    """AnonHugePages of this process: what is actually backed by huge pages now."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
