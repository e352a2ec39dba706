"""The link: a port chosen by pyserial URL, the device's sender and the link budget.

The sender reads frames from the persistent queue in sequence order and keeps at most ``window``
DATA frames unacknowledged (go-back-N): on a gap report or when the oldest frame waits longer than
the retransmission timeout it resends from the ground's cumulative acknowledgement, doubling the
timeout on every expiry in a row. Every byte it writes first takes tokens from a bucket that fills
at the link budget and holds one frame, so over any span T it writes at most budget × T + one frame.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from edge_sdk.errors import ConfigError, TelemetryError

from . import wire
from .wire import ACK_GAP, SERIAL_ERRORS, now_ms, open_port
from .queue import MAX_RECORD, TelemetryQueue
from ..token_bucket import TokenBucket
from .records import DataBatch, batch_overhead, encode_batch, get_varint, put_varint

log = logging.getLogger(__name__)
MIN_FRAME_LIMIT = 192  # payload bytes a frame shrinks to on a lossy line (a single longer record still goes)


@dataclass
class LinkStats:
    frames_sent: int = 0
    bytes_sent: int = 0
    payload_bytes_sent: int = 0
    retransmits: int = 0
    timeouts: int = 0
    acks: int = 0
    crc_errors: int = 0
    auth_failures: int = 0
    bad_frames: int = 0
    reconnects: int = 0


@dataclass
class _InFlight:
    first: int
    last: int
    sent_at: float


class Sender:
    """Device side of the link: sends the queue, handles ACKs and downlink COMMAND frames."""

    def __init__(self, url: str, key: bytes, queue: TelemetryQueue, *, budget: float | None = None,
                 window: int = 8, max_frame: int = 1024, rto: float = 1.0, max_rto: float = 8.0,
                 on_command: Callable[[wire.Frame], bytes | None] | None = None, port_factory=open_port,
                 clock: Callable[[], float] = time.time):
        if not MAX_RECORD + 64 <= max_frame <= wire.MAX_FRAME - 64:
            raise ConfigError(f"max frame {max_frame} B out of range", hint=f"use {MAX_RECORD + 64}..{wire.MAX_FRAME - 64}")
        if window < 1:
            raise ConfigError(f"window {window} must be at least 1")
        if budget is not None and budget <= 0:
            raise ConfigError(f"link budget {budget} B/s must be positive", hint="omit --link-budget for no limit")
        self.url, self.key, self.queue = url, key, queue
        self.clock = clock  # wall clock (s) for frame timestamps
        self.window, self.max_frame = window, max_frame
        # wire size of a full frame: COBS adds one byte per 254, the delimiters two
        self.bucket = TokenBucket(budget, max_frame + wire.MIN_FRAME + max_frame // 254 + 3)
        # the retransmission timeout must outlast a whole window on a budgeted line
        self.base_rto = rto + (window * self.bucket.capacity / budget if budget else 0.0)
        self.max_rto = max(max_rto, self.base_rto)
        self.on_command = on_command
        self.stats = LinkStats()
        self._port_factory = port_factory
        self._port = None
        self._deframer = wire.Deframer()
        self._inflight: list[_InFlight] = []
        self._cursor = queue.acked
        self._rto = self.base_rto
        self._rewound_at = -1
        self._outbox: list[bytes] = []  # RESULT frames, sent before data
        self._next_size = self.bucket.capacity
        # frames shrink when the line loses them (a noisy line kills long frames first) and grow back
        self._frame_limit = max_frame

    # ---- main loop ----------------------------------------------------------------------------
    def run(self, stop, *, drained=None) -> None:
        """Run until ``stop`` (a threading.Event) is set; ``drained`` is set whenever nothing is pending."""
        backoff = 0.2
        while not stop.is_set():
            try:
                if self._port is None:
                    self._port = self._port_factory(self.url)
                    self._reset_window()
                    backoff = 0.2
                self.step(drained)
            except (TelemetryError, OSError) + SERIAL_ERRORS as exc:
                self._close()
                self.stats.reconnects += 1
                log.warning("link %s down (%s); retrying in %.1f s", self.url, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self._close()

    def step(self, drained=None) -> None:
        """One turn: read what arrived, handle it, send what the window and the budget allow."""
        busy = self._receive()
        busy |= self._send_outbox()
        busy |= self._send_data()
        self._check_timeout()
        pending = bool(self._inflight) or bool(self._outbox) or bool(self.queue.pending(self._cursor, 1))
        if drained is not None:
            (drained.set if not pending else drained.clear)()
        if busy:
            return
        if self._outbox or (self._has_room() and self.queue.pending(self._cursor, 1)):
            # held back by the budget only: sleep exactly until the next frame may go
            time.sleep(min(0.05, max(0.0005, self.bucket.wait_time(self._next_size))))
        else:
            self._wait_input()

    def _reset_window(self) -> None:
        self._inflight.clear()
        self._cursor = self.queue.acked
        self._deframer = wire.Deframer()

    def _close(self) -> None:
        if self._port is not None:
            try:
                self._port.close()
            except Exception:  # closing a dead port must not hide the error that killed it
                pass
            self._port = None

    # ---- input --------------------------------------------------------------------------------
    def _wait_input(self) -> None:
        first = self._port.read(1)
        if first:
            self._handle_bytes(first)

    def _receive(self) -> bool:
        n = self._port.in_waiting
        if not n:
            return False
        self._handle_bytes(self._port.read(n))
        return True

    def _handle_bytes(self, data: bytes) -> None:
        for frame in wire.verified_frames(self._deframer, data, self.key, self.stats):
            if frame.stream != self.queue.stream_id:
                self.stats.bad_frames += 1
            elif frame.type == wire.FrameType.ACK:
                self._on_ack(frame)
            elif frame.type == wire.FrameType.COMMAND and self.on_command is not None:
                result = self.on_command(frame)
                if result is not None:
                    self._outbox.append(wire.encode(
                        wire.Frame(wire.FrameType.RESULT, self.queue.stream_id, frame.seq, now_ms(self.clock), result), self.key))
            else:
                self.stats.bad_frames += 1

    def _on_ack(self, frame: wire.Frame) -> None:
        self.stats.acks += 1
        ack, flags = frame.seq, (get_varint(frame.payload, 0)[0] if frame.payload else 0)
        if ack > self.queue.acked:
            self.queue.ack(ack)
            self._rto = self.base_rto
            self._frame_limit = min(self.max_frame, self._frame_limit + 64)
        self._inflight = [f for f in self._inflight if f.last > ack]
        if ack > self._cursor:
            self._cursor = ack
        if flags & ACK_GAP and ack < self._cursor and ack != self._rewound_at:
            # the ground lost a frame: resend from its acknowledgement, once per acknowledgement
            self._rewound_at = ack
            self._go_back(ack)

    def _go_back(self, ack: int) -> None:
        self._frame_limit = max(MIN_FRAME_LIMIT, self._frame_limit // 2)
        self.stats.retransmits += len(self._inflight)
        self._inflight.clear()
        self._cursor = max(ack, self.queue.acked)

    def _check_timeout(self) -> None:
        if self._inflight and time.monotonic() - self._inflight[0].sent_at > self._rto:
            self.stats.timeouts += 1
            self._rto = min(self._rto * 2, self.max_rto)
            self._rewound_at = -1
            self._go_back(self.queue.acked)

    # ---- output -------------------------------------------------------------------------------
    def _has_room(self) -> bool:
        return len(self._inflight) < self.window

    def _write(self, data: bytes) -> bool:
        self._next_size = len(data)
        if self.bucket.wait_time(len(data)) > 0:
            return False
        self.bucket.take(len(data))
        self._port.write(data)
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(data)
        return True

    def _send_outbox(self) -> bool:
        sent = False
        while self._outbox and self._write(self._outbox[0]):
            self._outbox.pop(0)
            sent = True
        return sent

    def _send_data(self) -> bool:
        if self._outbox or not self._has_room():
            return False
        t = now_ms(self.clock)
        batch, payload_bytes = self._next_batch(t)
        if batch is None:
            return False
        frame = wire.Frame(wire.FrameType.DATA, self.queue.stream_id, batch.records[0].seq, t, encode_batch(batch, t))
        if not self._write(wire.encode(frame, self.key)):
            return False
        self.stats.payload_bytes_sent += payload_bytes
        self._inflight.append(_InFlight(batch.records[0].seq, batch.records[-1].seq, time.monotonic()))
        self._cursor = batch.records[-1].seq
        return True

    def _next_batch(self, t: int) -> tuple[DataBatch | None, int]:
        records = self.queue.pending(self._cursor, 128)
        if not records:
            return None, 0
        floor = self.queue.acked
        head = bytearray()
        for n in (floor, self._cursor, self.queue.dropped, 255):
            put_varint(head, n)
        size, taken, payload = len(head) + 2, [], 0
        prev = self._cursor
        for r in records:
            cost = batch_overhead(r, t, prev) + len(r.body)
            if taken and size + cost > self._frame_limit:
                break
            taken.append(r)
            size += cost
            payload += len(r.body)
            prev = r.seq
        return DataBatch(floor, self._cursor, self.queue.dropped, tuple(taken)), payload
