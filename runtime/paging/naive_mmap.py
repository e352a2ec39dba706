"""The naive baseline the benchmark compares against: layers computed straight from an mmap of the
weights file (as llama.cpp does), faulted in by the compute thread page by page with the kernel's
readahead, no prefetch thread. After each paged layer its pages are dropped from the mapping and the
page cache, which is what a memory limit of the same budget does to a cyclic scan over more bytes
than it holds (LRU evicts every paged layer before it is needed again)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from edge_sdk.paging_model import PAGE


class MmapPages:
    """Same verbs as LayerReader: get(i) -> (token, bytes of layer i), release(token)."""

    def __init__(self, path: Path, layers: dict[int, tuple[int, int]]):
        self.layers = layers
        self.fd = os.open(path, os.O_RDONLY)
        self.map = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ)
        self.bytes = np.frombuffer(self.map, np.uint8)
        self.layers_read = 0

    def get(self, layer: int) -> tuple[int, np.ndarray]:
        offset, nbytes = self.layers[layer]
        self.layers_read += 1
        return layer, self.bytes[offset:offset + nbytes]

    def release(self, layer: int) -> None:
        offset, nbytes = self.layers[layer]
        length = -(-nbytes // PAGE) * PAGE
        self.map.madvise(mmap.MADV_DONTNEED, offset, length)
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        del self.bytes
        self.map.close()
        os.close(self.fd)
