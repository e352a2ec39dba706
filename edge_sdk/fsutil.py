"""Durable file-system steps shared by everything that must survive a crash or power cut."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UnsafeFileError(ValueError):
    """A path inside a tree that is a symlink, a special file, or missing."""


_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # NONBLOCK: a FIFO never hangs open()
_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)


def open_regular(root: str | Path, rel: str) -> int:
    """A read-only descriptor of the regular file `rel` under `root`, opened component by component with
    O_NOFOLLOW: no symlink below `root` is followed, and a FIFO, device or directory is refused."""
    parts = rel.split("/")
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts[:-1]):
            nxt = _open_at(part, _DIR_FLAGS, dir_fd, "/".join(parts[: i + 1]), "directory")
            os.close(dir_fd)
            dir_fd = nxt
        fd = _open_at(parts[-1], _FILE_FLAGS, dir_fd, rel, "regular file")
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFileError(f"{rel} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _open_at(name: str, flags: int, dir_fd: int, rel: str, kind: str) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise UnsafeFileError(f"{rel} is missing") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
                raise UnsafeFileError(f"{rel} is a symlink") from None
            raise UnsafeFileError(f"{rel} is not a {kind}") from None
        raise UnsafeFileError(f"{rel} cannot be opened ({exc.strerror})") from None
