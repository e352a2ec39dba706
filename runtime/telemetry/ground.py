"""Ground side of the link: verify, acknowledge, drop duplicates, write records, report gaps.

Frames are accepted in order only (the device resends from the acknowledgement, go-back-N), so a
record is new exactly when its sequence number is above the stream's acknowledgement. Records
are written and fsynced before the acknowledgement that covers them leaves, and the state (the
acknowledgement and the schemas of each stream) is rebuilt from the output file on restart.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_sdk.errors import TelemetryError

from . import commands, wire
from .wire import ACK_GAP, SERIAL_ERRORS, now_ms, open_port
from .records import KINDS, SCHEMA_KIND, decode_batch, decode_record, decode_values, merge_schema, put_varint

log = logging.getLogger(__name__)
_PORT_ERRORS = (OSError,) + SERIAL_ERRORS


def apply_schema_row(schemas: dict, row: dict) -> None:
    merge_schema(schemas, row["schema"], row.get("start", 0), row["fields"])


def record_row(stream: int, record, schemas: dict[int, tuple[str, ...]]) -> dict:
    """The row `telemetry listen` writes for a record (the MQTT uplink publishes the same)."""
    row = {"stream": f"{stream:08x}", "seq": record.seq, "time_ms": record.time_ms,
           "kind": KINDS.get(record.kind, str(record.kind)), "priority": record.priority}
    try:
        if record.kind == SCHEMA_KIND:
            schema_id, start, *names = decode_values(record.body)
            row.update(schema=schema_id, start=start, fields=names)
        else:
            row["data"] = decode_record(record.body, schemas)
    except TelemetryError as exc:
        row.update(error=str(exc), body=record.body.hex())
    return row


@dataclass
class StreamState:
    ack: int = 0
    schemas: dict = field(default_factory=dict)  # schema id -> field names
    records: int = 0
    duplicates: int = 0
    gaps: int = 0
    skipped: int = 0  # sequence numbers the device dropped before sending (full queue)
    device_dropped: int = 0  # the device's own drop counter, as last reported


@dataclass
class GroundStats:
    frames: int = 0
    crc_errors: int = 0
    auth_failures: int = 0
    bad_frames: int = 0
    undecodable: int = 0
    reconnects: int = 0  # outages of the port survived (adapter unplugged, pty gone)


class GroundStation:
    """Receives one or more device streams on a port; optionally sends downlink commands."""

    def __init__(self, url: str, key: bytes, out: str | os.PathLike | None = None, *, ack_data: bool = True,
                 counter_file: str | os.PathLike | None = None, port_factory=open_port, on_record=None,
                 clock=time.time):
        self.url, self.key, self.ack_data = url, key, ack_data
        self.clock = clock  # wall clock (s) for frame timestamps
        self.streams: dict[int, StreamState] = {}
        self.stats = GroundStats()
        self.on_record = on_record
        self._port_factory = port_factory
        self._port = port_factory(url)
        self._backoff = 0.2  # s before the next attempt to reopen a lost port, doubling up to 5 s
        self._retry_at = 0.0
        self._deframer = wire.Deframer()
        self._write_lock = threading.Lock()
        self._results: dict[int, commands.CommandResult] = {}
        self._results_cv = threading.Condition()
        self._counter_file = Path(counter_file) if counter_file else None
        self._last_counter = 0
        self._out = None
        if out is not None:
            self._load(Path(out))
            self._out = open(out, "a", encoding="utf-8")

    # ---- state --------------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        if not path.exists():
            return
        with open(path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                # a line cut short by a crash: its records were never acknowledged, they come again
                fh.truncate(data.rfind(b"\n") + 1)
        for line in data[:data.rfind(b"\n") + 1].splitlines():
            try:
                row = json.loads(line)
                state = self.streams.setdefault(int(row["stream"], 16), StreamState())
            except (ValueError, KeyError):
                continue
            state.ack = max(state.ack, row["seq"])
            if row.get("kind") == "schema":
                apply_schema_row(state.schemas, row)

    def summary(self) -> dict:
        return {"frames": asdict(self.stats),
                "streams": {f"{sid:08x}": {k: v for k, v in asdict(s).items() if k != "schemas"}
                            for sid, s in self.streams.items()}}

    # ---- loop ---------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll()

    def poll(self) -> None:
        """Read what arrived and handle it. A lost port (unplugged adapter) is reopened with backoff;
        the stream state stays, so the device's resends fill the outage without duplicates."""
        port = self._port or self._reopen()
        if port is None:
            return
        try:
            data = port.read(max(1, port.in_waiting))
        except _PORT_ERRORS as exc:
            self._lost(port, exc)
            return
        except (TypeError, AttributeError, ValueError):
            if self._port is port:
                raise
            return  # a write on another thread found the port dead and closed it under this read
        if data:
            self.handle_bytes(data)

    def _lost(self, port, exc: Exception) -> None:
        with self._write_lock:
            if self._port is not port:
                return  # another thread already noticed
            self._port = None
        try:
            port.close()
        except Exception:  # closing a dead port must not hide the error that killed it
            pass
        self._deframer = wire.Deframer()  # a frame cut by the outage is garbage
        self._backoff, self._retry_at = 0.2, time.monotonic() + 0.2
        log.warning("port %s lost (%s); reopening until it comes back", self.url, exc)

    def _reopen(self):
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, 0.05))
            return None
        try:
            port = self._port_factory(self.url)
        except TelemetryError:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)
            return None
        with self._write_lock:
            self._port = port
        self.stats.reconnects += 1
        log.info("port %s is back", self.url)
        return port

    def handle_bytes(self, data: bytes) -> None:
        for frame in wire.verified_frames(self._deframer, data, self.key, self.stats):
            self.stats.frames += 1
            if frame.type == wire.FrameType.DATA:
                self._on_data(frame)
            elif frame.type == wire.FrameType.RESULT:
                self._on_result(frame)
            else:
                self.stats.bad_frames += 1

    def _on_data(self, frame: wire.Frame) -> None:
        state = self.streams.setdefault(frame.stream, StreamState())
        if not self.ack_data:
            return
        try:
            batch = decode_batch(frame.payload, frame.time_ms)
        except TelemetryError:
            self.stats.bad_frames += 1
            return
        state.device_dropped = batch.dropped
        state.ack = max(state.ack, batch.floor)
        if batch.after > state.ack:
            state.gaps += 1
            log.info("stream %08x: gap after %d (frame starts after %d); asking to resend",
                     frame.stream, state.ack, batch.after)
            self._send_ack(frame.stream, state.ack, ACK_GAP)
            return
        rows = []
        for record in batch.records:
            if record.seq <= state.ack:
                state.duplicates += 1
                continue
            state.skipped += record.seq - state.ack - 1
            rows.append(self._row(frame.stream, state, record))
            state.ack = record.seq
            state.records += 1
        if rows and self._out is not None:
            self._out.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
            self._out.flush()
            os.fsync(self._out.fileno())
        if self.on_record is not None:
            for row in rows:
                self.on_record(row)
        self._send_ack(frame.stream, state.ack, 0)

    def _row(self, stream: int, state: StreamState, record) -> dict:
        row = record_row(stream, record, state.schemas)
        if "error" in row:
            self.stats.undecodable += 1
        elif record.kind == SCHEMA_KIND:
            apply_schema_row(state.schemas, row)
        return row

    def _send_ack(self, stream: int, ack: int, flags: int) -> None:
        payload = bytearray()
        put_varint(payload, flags)
        self._write(wire.Frame(wire.FrameType.ACK, stream, ack, now_ms(self.clock), bytes(payload)))

    def _write(self, frame: wire.Frame) -> None:
        """Send a frame; while the port is down it is dropped (ACKs and commands are sent again)."""
        with self._write_lock:
            port = self._port
            if port is None:
                return
            try:
                port.write(wire.encode(frame, self.key))
                return
            except _PORT_ERRORS as exc:
                error = exc
        self._lost(port, error)

    # ---- downlink commands --------------------------------------------------------------------
    def _next_counter(self) -> int:
        # monotonic across restarts of the ground: persisted, and never below the clock in seconds
        last = int(self._counter_file.read_text()) if self._counter_file and self._counter_file.exists() else 0
        counter = max(last + 1, self._last_counter + 1, int(time.time()))
        self._last_counter = counter
        if self._counter_file:
            tmp = self._counter_file.with_suffix(".tmp")
            tmp.write_text(str(counter))
            os.replace(tmp, self._counter_file)
        return counter

    def command_frame(self, stream: int, name: str, *args, counter: int | None = None) -> wire.Frame:
        counter = self._next_counter() if counter is None else counter
        return wire.Frame(wire.FrameType.COMMAND, stream, counter, now_ms(self.clock), commands.encode_command(name, args))

    def send_command(self, stream: int, name: str, *args, timeout: float = 10.0, retry: float = 1.0,
                     frame: wire.Frame | None = None) -> commands.CommandResult:
        """Send a command (or a prepared frame) and wait for its result, resending every ``retry`` s.
        The caller must keep ``poll()`` running (or ``run()`` on a thread)."""
        frame = frame or self.command_frame(stream, name, *args)
        deadline = time.monotonic() + timeout
        with self._results_cv:
            self._results.pop(frame.seq, None)
        while time.monotonic() < deadline:
            self._write(frame)
            with self._results_cv:
                self._results_cv.wait_for(lambda: frame.seq in self._results, min(retry, deadline - time.monotonic()))
                if frame.seq in self._results:
                    return self._results.pop(frame.seq)
        raise TelemetryError(f"no result for command {name!r} within {timeout:.0f} s",
                             hint="check that the uplink runs on the other end and uses the same key")

    def _on_result(self, frame: wire.Frame) -> None:
        try:
            result = commands.decode_result(frame.seq, frame.payload)
        except TelemetryError:
            self.stats.bad_frames += 1
            return
        with self._results_cv:
            self._results[frame.seq] = result
            self._results_cv.notify_all()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
        if self._port is not None:
            self._port.close()
