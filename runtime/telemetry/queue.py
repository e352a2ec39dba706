"""Persistent store-and-forward queue: SQLite in WAL mode in the device's state directory.

Durability: ``synchronous=FULL`` on every transaction that adds records or advances the command
counter, ``NORMAL`` on those that only delete acknowledged records. In WAL mode FULL syncs the log
at each commit, so a committed record survives power loss as well as kill -9; that matters because
sequence numbers come from the database: a commit lost to a power cut would hand out the same
sequence numbers again for new records, and the ground, having seen them, would drop the new ones
as duplicates. A lost delete only means a record is sent twice, which the ground drops, so those
commits skip the sync (each FULL commit also syncs every NORMAL one before it: the log is sequential).
The enqueue rate is a batch per collector tick plus events, so one fsync per commit is cheap.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from edge_sdk.errors import TelemetryError

from .records import SCHEMA_KIND, WireRecord, encode_record, encode_schema

RECORD_OVERHEAD = 16  # bytes counted per record beside its body (row and index cost, roughly)
MAX_RECORD = 900  # body bytes: a record must fit one frame
PRIORITY_SCHEMA = 255  # schema records are never dropped: later records cannot be read without them
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY AUTOINCREMENT, time_ms INTEGER NOT NULL,"
    " kind INTEGER NOT NULL, priority INTEGER NOT NULL, body BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS records_drop_order ON records (priority, seq)",
    "CREATE TABLE IF NOT EXISTS schemas (id INTEGER PRIMARY KEY, fields TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
)


class TelemetryQueue:
    """Records waiting for the ground's acknowledgement, bounded by bytes."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = 16 << 20):
        if max_bytes < 4096:
            raise TelemetryError(f"queue size {max_bytes} B is too small", hint="use at least 4096 bytes")
        self.path = Path(path)
        self.max_bytes = max_bytes
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as exc:
            raise TelemetryError(f"cannot open the telemetry queue {self.path}: {exc}",
                                 hint="check that the state directory is writable or pass --state-dir") from exc
        self._lock = threading.RLock()
        with self._txn(durable=True):
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('stream', ?)", (secrets.randbits(32) or 1,))
        self._schemas = {tuple(f.split("\x1f")): i for i, f in self._db.execute("SELECT id, fields FROM schemas")}
        self.stream_id = int(self._meta("stream"))
        (self._bytes,) = self._db.execute(
            "SELECT COALESCE(SUM(length(body)), 0) + COUNT(*) * ? FROM records", (RECORD_OVERHEAD,)).fetchone()

    # ---- transactions -------------------------------------------------------------------------
    @contextmanager
    def _txn(self, durable: bool):
        with self._lock:
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _meta(self, key: str, default=None):
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def _set_meta(self, key: str, value) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ---- producer side ------------------------------------------------------------------------
    def add(self, items: list[tuple[dict, int, int, int]]) -> list[int]:
        """Store records durably. items: (record dict, kind, priority, time_ms). Returns their seqs."""
        seqs = []
        with self._txn(durable=True):
            for record, kind, priority, time_ms in items:
                if not 1 <= kind <= 255 or not 0 <= priority < PRIORITY_SCHEMA:
                    raise TelemetryError(f"record kind {kind} / priority {priority} out of range",
                                         hint="kind 1-255, priority 0-254")
                fields = tuple(record)
                schema_id = self._schemas.get(fields)
                if schema_id is None:
                    schema_id = self._new_schema(fields, time_ms)
                body = encode_record(schema_id, fields, record)
                if len(body) > MAX_RECORD:
                    raise TelemetryError(f"record of {len(body)} B exceeds {MAX_RECORD} B",
                                         hint="split it into several records")
                seqs.append(self._insert(time_ms, kind, priority, body))
            self._enforce_bound()
        return seqs

    def _new_schema(self, fields: tuple[str, ...], time_ms: int) -> int:
        if any("\x1f" in f for f in fields):
            raise TelemetryError(f"field names may not contain \\x1f: {fields}")
        cur = self._db.execute("INSERT INTO schemas (fields) VALUES (?)", ("\x1f".join(fields),))
        schema_id = cur.lastrowid
        # a long field list travels in several schema records, each (schema id, first index, names...)
        start = 0
        while start < len(fields) or start == 0:
            end, size = start, 8
            while end < len(fields) and (end == start or size + len(fields[end]) + 3 <= MAX_RECORD):
                size += len(fields[end].encode()) + 3
                end += 1
            self._insert(time_ms, SCHEMA_KIND, PRIORITY_SCHEMA, encode_schema(schema_id, fields[start:end], start))
            if end >= len(fields):
                break
            start = end
        self._schemas[fields] = schema_id
        return schema_id

    def _insert(self, time_ms: int, kind: int, priority: int, body: bytes) -> int:
        cur = self._db.execute("INSERT INTO records (time_ms, kind, priority, body) VALUES (?, ?, ?, ?)",
                               (time_ms, kind, priority, body))
        self._bytes += len(body) + RECORD_OVERHEAD
        return cur.lastrowid

    def _enforce_bound(self) -> None:
        # oldest of the lowest priority first; schema records never
        while self._bytes > self.max_bytes:
            victims = self._db.execute(
                "SELECT seq, priority, length(body) FROM records WHERE priority < ? ORDER BY priority, seq LIMIT 64",
                (PRIORITY_SCHEMA,)).fetchall()
            if not victims:
                return
            for seq, priority, size in victims:
                if self._bytes <= self.max_bytes:
                    break
                self._db.execute("DELETE FROM records WHERE seq = ?", (seq,))
                self._bytes -= size + RECORD_OVERHEAD
                self._set_meta(f"dropped.{priority}", int(self._meta(f"dropped.{priority}", 0)) + 1)
                self._set_meta("dropped", self.dropped + 1)

    # ---- link side ----------------------------------------------------------------------------
    def schemas(self) -> dict[int, tuple[str, ...]]:
        """The persisted schema table, schema id -> field names (to decode queued records on the device)."""
        with self._lock:
            return {i: fields for fields, i in self._schemas.items()}

    def pending(self, after: int, limit: int = 256) -> list[WireRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, time_ms, kind, priority, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit)).fetchall()
        return [WireRecord(*row) for row in rows]

    def ack(self, seq: int) -> int:
        """The ground holds every record up to seq: forget them. Returns how many were removed."""
        with self._txn(durable=False):
            if seq <= self.acked:
                return 0
            (size, count) = self._db.execute(
                "SELECT COALESCE(SUM(length(body)), 0), COUNT(*) FROM records WHERE seq <= ?", (seq,)).fetchone()
            self._db.execute("DELETE FROM records WHERE seq <= ?", (seq,))
            self._bytes -= size + count * RECORD_OVERHEAD
            self._set_meta("acked", seq)
        return count

    @property
    def acked(self) -> int:
        with self._lock:
            return int(self._meta("acked", 0))

    @property
    def dropped(self) -> int:
        with self._lock:
            return int(self._meta("dropped", 0))

    def drops_by_priority(self) -> dict[int, int]:
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM meta WHERE key LIKE 'dropped.%'").fetchall()
        return {int(k.split(".")[1]): int(v) for k, v in rows}

    def stats(self) -> dict:
        with self._lock:
            (count, last) = self._db.execute("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM records").fetchone()
            (issued,) = self._db.execute(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'records'), 0)").fetchone()
        return {"stream": f"{self.stream_id:08x}", "records": count, "bytes": self._bytes, "max_bytes": self.max_bytes,
                "last_seq": issued, "acked": self.acked, "dropped": self.dropped,
                "dropped_by_priority": self.drops_by_priority()}

    # ---- downlink command counter -------------------------------------------------------------
    def last_command(self) -> tuple[int, bytes | None]:
        with self._lock:
            return int(self._meta("command.counter", 0)), self._meta("command.result")

    def accept_command(self, counter: int) -> bool:
        """Advance the persisted counter to ``counter`` if it is newer; False for a replay."""
        with self._txn(durable=True):
            if counter <= int(self._meta("command.counter", 0)):
                return False
            self._set_meta("command.counter", counter)
            self._set_meta("command.result", None)
        return True

    def store_result(self, counter: int, result: bytes) -> None:
        with self._txn(durable=True):
            if int(self._meta("command.counter", 0)) == counter:
                self._set_meta("command.result", result)

    def close(self) -> None:
        with self._lock:
            self._db.close()
