"""Sequential read MB/s and 4K random read IOPS of a filesystem, bounded in time, direct I/O where allowed."""

from __future__ import annotations

import mmap
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError, PlatformError

_BLOCK = 1 << 20  # sequential read size
_PAGE = 4096


@dataclass
class StorageResult:
    seq_mbps: float
    rand4k_iops: float
    direct: bool  # O_DIRECT was used (else buffered reads after dropping the file from the page cache)
    note: str
    file_mb: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _open_read(path: Path) -> tuple[int, bool, str]:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True, "O_DIRECT"
        except OSError as exc:
            why = f"O_DIRECT refused ({exc.strerror}; tmpfs and some overlay filesystems do not support it)"
    else:
        why = "O_DIRECT is not available on this OS"
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        why += "; buffered reads after dropping the file from the page cache (numbers may be optimistic)"
    return fd, False, why


def probe_storage(directory: str | os.PathLike, *, seconds: float = 2.0, size_mb: int = 64) -> StorageResult:
    """Write a scratch file in directory, then read it sequentially and at random 4K offsets, ~seconds in all."""
    if not (0.05 <= seconds <= 60 and 1 <= size_mb <= 4096):
        raise ConfigError(f"storage probe of {size_mb} MB for {seconds} s is out of range",
                          hint="use 0.05-60 seconds and 1-4096 MB")
    directory = Path(directory)
    if not directory.is_dir():
        raise PlatformError(f"storage probe directory {directory} does not exist", hint="pass an existing directory (where bundles live)")
    size = size_mb * _BLOCK
    chunk = os.urandom(_BLOCK)  # incompressible, so compressing filesystems do not flatter the result
    fd_w, name = tempfile.mkstemp(prefix=".edge-sdk-probe-", dir=directory)
    try:
        try:
            for _ in range(size_mb):
                os.write(fd_w, chunk)
            os.fsync(fd_w)
        except OSError as exc:
            raise PlatformError(f"cannot write a {size_mb} MB probe file in {directory}: {exc.strerror}",
                                hint="free some space or choose another --bundle-dir") from exc
        finally:
            os.close(fd_w)
        fd, direct, note = _open_read(Path(name))
        buf = mmap.mmap(-1, _BLOCK)  # page-aligned, as O_DIRECT requires
        try:
            seq = _sequential(fd, buf, size, seconds / 2, direct)
            if not direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            iops = _random4k(fd, size, seconds / 2)
        finally:
            os.close(fd)
            buf.close()
    finally:
        os.unlink(name)
    return StorageResult(seq_mbps=round(seq, 1), rand4k_iops=round(iops), direct=direct, note=note, file_mb=size_mb)


def _sequential(fd: int, buf: mmap.mmap, size: int, budget_s: float, direct: bool = True) -> float:
    """MB/s reading the file front to back, again and again (direct I/O only) until the budget is spent."""
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        if done and done % size == 0 and not direct:
            break  # a second buffered pass would read the page cache
        n = os.preadv(fd, [buf], done % size)
        if n <= 0:
            break
        done += n
    return done / 1e6 / max(time.perf_counter() - t0, 1e-9)  # MB/s (1e6 bytes/s), as boards.json's read_mbps


def _random4k(fd: int, size: int, budget_s: float) -> float:
    page = mmap.mmap(-1, _PAGE)
    rng = random.Random(0)
    pages = size // _PAGE
    ops, t0 = 0, time.perf_counter()
    try:
        while time.perf_counter() - t0 < budget_s:
            for _ in range(64):
                os.preadv(fd, [page], rng.randrange(pages) * _PAGE)
            ops += 64
    finally:
        page.close()
    return ops / max(time.perf_counter() - t0, 1e-9)
