"""Reader thread: streams paged layers from the weights file into a few reusable aligned buffers,
ahead of the layer that computes, cycling over the paged layers in forward order."""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from edge_sdk.errors import BundleError

from ..token_bucket import TokenBucket
from edge_sdk.paging_model import PAGE, page_round

log = logging.getLogger("edge_sdk.runtime")
CHUNK = 4 << 20  # bytes per preadv call (and per throttle grant)
READ_BURST = 8 << 20  # bytes an emulated storage throttle lets through at once


class WeightsFile:
    """The bundle's weights file opened for large aligned reads: O_DIRECT where the filesystem allows
    it, else buffered reads followed by POSIX_FADV_DONTNEED so the page cache does not hold the layer."""

    def __init__(self, path: Path, needed_bytes: int, throttle: TokenBucket | None = None, direct: bool = True):
        self.path, self.throttle = Path(path), throttle
        self.read_bytes, self.read_seconds = 0, 0.0  # totals of read_into: the storage speed as used
        self.fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.direct_fd = None
        if self.size < needed_bytes:
            os.close(self.fd)
            raise self.truncated(needed_bytes)
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                self.direct_fd = None  # tmpfs and some overlays refuse O_DIRECT

    @property
    def mode(self) -> str:
        return "O_DIRECT" if self.direct_fd is not None else "buffered+fadvise"

    def truncated(self, needed: int) -> BundleError:
        return BundleError(f"{self.path} is {self.size:,} bytes but the manifest places weights up to byte {needed:,}: "
                           "the file is truncated", hint="copy the bundle again and check it with `edge-sdk verify`")

    def read_into(self, buf: np.ndarray, offset: int, nbytes: int) -> None:
        """Fill buf[:nbytes] from the file at `offset` (page aligned)."""
        assert offset % PAGE == 0 and buf.ctypes.data % PAGE == 0
        start = time.perf_counter()
        end, pos = page_round(nbytes), 0
        view = memoryview(buf)
        while pos < nbytes:
            n = min(CHUNK, end - pos)
            if self.throttle:
                self.throttle.pace(n)
            got = self._pread(view[pos:pos + n], offset + pos)
            if got <= 0:
                self.size = os.fstat(self.fd).st_size
                raise self.truncated(offset + nbytes)
            pos += got
        if self.direct_fd is None and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, end, os.POSIX_FADV_DONTNEED)
        self.read_bytes += nbytes
        self.read_seconds += time.perf_counter() - start

    def _pread(self, view: memoryview, offset: int) -> int:
        if self.direct_fd is not None:
            try:
                return os.preadv(self.direct_fd, [view], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.close(self.direct_fd)  # alignment the device refuses: fall back for good
                self.direct_fd = None
        return os.preadv(self.fd, [view], offset)

    def pread(self, nbytes: int, offset: int) -> bytes:
        """Small unaligned read through the page cache (embedding rows)."""
        data = os.pread(self.fd, nbytes, offset)
        if len(data) != nbytes:
            raise self.truncated(offset + nbytes)
        return data

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None


class LayerReader:
    """get(i) returns layer i's bytes in a slot buffer; release(slot) hands the slot back for the
    next read. The thread reads the paged layers cyclically, as far ahead as free slots allow."""

    def __init__(self, wf: WeightsFile, layers: dict[int, tuple[int, int]], order: tuple[int, ...], slots: list[np.ndarray]):
        self.wf, self.layers, self.order, self.slots = wf, layers, order, slots
        self.free: queue.Queue = queue.Queue()
        self.ready: queue.Queue = queue.Queue()
        for k in range(len(slots)):
            self.free.put(k)
        self.stop = threading.Event()
        self.layers_read = 0
        self.thread = threading.Thread(target=self._run, name="edge-sdk-layer-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for layer in self.order:
                slot = self.free.get()
                if slot is None or self.stop.is_set():
                    return
                offset, nbytes = self.layers[layer]
                try:
                    self.wf.read_into(self.slots[slot], offset, nbytes)
                except Exception as exc:  # handed to the computing thread, which raises it
                    self.ready.put((layer, slot, exc))
                    return
                self.layers_read += 1
                if not self._handoff(layer, slot):
                    return

    def _handoff(self, layer: int, slot: int) -> bool:
        """Hand a filled slot to the computing thread; False stops the thread (closing)."""
        self.ready.put((layer, slot, None))
        return True

    def get(self, layer: int) -> tuple[int, np.ndarray]:
        while True:
            got, slot, exc = self.ready.get()
            if exc is not None:
                self.ready.put((got, slot, exc))  # every later call fails the same way
                raise exc if isinstance(exc, BundleError) else BundleError(
                    f"reading layer {got} from {self.wf.path} failed: {exc}", hint="check the storage device") from exc
            if got == layer:
                return slot, self.slots[slot]
            self.release(slot)  # left over from a forward pass that stopped early

    def release(self, slot: int) -> None:
        self.free.put(slot)

    def close(self) -> None:
        self.stop.set()
        self.free.put(None)
        self.thread.join(timeout=10)
