"""How far a ground exporter has read the records file `telemetry listen` writes: a byte offset kept
beside it, replaced atomically and fsynced, so an exporter restarted after a crash or a power cut
resumes where its last acknowledged batch ended (at worst it sends that batch again; consumers keep
one row per device and sequence number)."""

from __future__ import annotations

import os
from pathlib import Path

from edge_sdk.fsutil import fsync_path


class ExportCursor:
    def __init__(self, source: Path, suffix: str):
        self.source = source
        self.path = source.with_name(f"{source.name}.{suffix}")

    def offset(self) -> int:
        try:
            return int(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def complete_rows(self, batch: int) -> tuple[int, list[bytes]]:
        """The offset read from and up to `batch` complete lines after it (a row still being written
        waits); an empty list when the records file is absent or has nothing new."""
        offset = self.offset()
        try:
            with open(self.source, "rb") as f:
                f.seek(offset)
                lines = [f.readline() for _ in range(batch)]
        except FileNotFoundError:
            return offset, []
        return offset, [ln for ln in lines if ln.endswith(b"\n")]

    def save(self, offset: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(offset))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_path(self.path.parent)
