"""Telemetry over MQTT: the device's direct uplink (``mqtt://host:port/prefix``) and the ground's exporter.

Topics, one per device and record kind (the device id is the queue's stream id, 8 hex digits, the
``stream`` of every row that `telemetry listen` writes)::

    PREFIX/DEVICE/schema|sample|event   one record per message, QoS 1: the JSON row of `telemetry listen`
                                        (stream, seq, time_ms, kind, priority, data | schema fields)
    PREFIX/DEVICE/status                "online" (birth, retained) / "offline" (the broker's last will)
    PREFIX/DEVICE/command               ground -> device: a COMMAND frame of the serial wire format
    PREFIX/DEVICE/result                device -> ground: its RESULT frame

Records leave the device's persistent queue only once the broker acknowledged every message of the
batch (PUBACK), so a broker outage leaves a backlog that drains afterwards: nothing is lost. QoS 1 is
at-least-once: a batch cut by a disconnect is published again, and a consumer keeps one row per
(stream, seq), as the serial ground does. Commands carry the wire format's HMAC and the persisted
counter: a bad MAC is dropped and reported, a replayed counter is answered REPLAY without running.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from edge_sdk.errors import ConfigError, TelemetryError, require

from . import wire
from .commands import Status
from .cursor import ExportCursor
from .link import LinkStats
from .ground import record_row
from .queue import TelemetryQueue
from .records import KINDS

log = logging.getLogger(__name__)
QOS = 1
REPLAY = int(Status.REPLAY)


@dataclass(frozen=True)
class MqttUrl:
    host: str
    port: int
    prefix: str

    def topic(self, device: str, leaf: str) -> str:
        return f"{self.prefix}/{device}/{leaf}" if self.prefix else f"{device}/{leaf}"


def parse_url(url: str) -> MqttUrl:
    """mqtt://host[:port]/prefix -> MqttUrl; anything else is one ConfigError naming the form."""
    parts = urlsplit(url)
    prefix = parts.path.strip("/")
    try:
        port = parts.port or 1883
    except ValueError:
        port = -1
    ok = parts.scheme == "mqtt" and parts.hostname and 0 < port < 65536 and not any(c in prefix for c in "#+\0")
    if not ok:
        raise ConfigError(f"{url!r} is not an MQTT URL", hint="use mqtt://host:port/prefix (prefix without # or +)")
    return MqttUrl(parts.hostname, port, prefix)


def is_mqtt(url: str) -> bool:
    return url.startswith("mqtt://")


class Connection:
    """One paho client: connects in the background, reconnects after a broker outage, QoS 1 publishes.
    ``connected`` is set once the broker acknowledged the ``subscribe`` topics (a message sent to them
    before that would find no subscriber)."""

    def __init__(self, url: MqttUrl, client_id: str, *, will: tuple[str, bytes] | None = None, subscribe: tuple[str, ...] = (),
                 on_connect: Callable[[], None] | None = None, on_message: Callable[[str, bytes], None] | None = None):
        mqtt = require("paho.mqtt.client", "runtime")
        self.url = url
        self.connected = threading.Event()
        self._topics, self._sub_mid = subscribe, None
        self._on_connect_cb, self._on_message_cb = on_connect, on_message
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if will:
            self.client.will_set(will[0], will[1], qos=QOS, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self) -> "Connection":
        self.client.connect_async(self.url.host, self.url.port, keepalive=30)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason, properties=None):
        if reason.is_failure:
            log.warning("MQTT broker %s:%d refused the connection: %s", self.url.host, self.url.port, reason)
            return
        if self._topics:
            _, self._sub_mid = client.subscribe([(t, QOS) for t in self._topics])
        if self._on_connect_cb:
            self._on_connect_cb()
        if not self._topics:
            self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None):
        if mid == self._sub_mid:
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason, properties=None):
        if self.connected.is_set():
            log.warning("MQTT broker %s:%d lost (%s): records wait in the queue", self.url.host, self.url.port, reason)
        self.connected.clear()

    def _on_message(self, client, userdata, msg):
        if self._on_message_cb:
            self._on_message_cb(msg.topic, msg.payload)

    def publish_all(self, messages: list[tuple[str, bytes, bool]], timeout_s: float) -> bool:
        """Publish (topic, payload, retain) at QoS 1; True once the broker acknowledged every one."""
        if not self.connected.is_set():
            return False
        infos = [self.client.publish(t, p, qos=QOS, retain=r) for t, p, r in messages]
        deadline = time.monotonic() + timeout_s
        try:
            for info in infos:
                while not info.is_published():
                    if time.monotonic() > deadline or not self.connected.is_set():
                        return False
                    time.sleep(0.005)
        except RuntimeError:  # published in the instant the connection dropped: the batch goes again
            return False
        return True


def _dumps(row: dict) -> bytes:
    return json.dumps(row, separators=(",", ":")).encode()


class MqttSender:
    """The device side over MQTT, in place of link.Sender: same queue, same rows, same command checks."""

    def __init__(self, url: str, key: bytes, queue: TelemetryQueue, *, on_command=None, report=None,
                 batch: int = 64, ack_timeout_s: float = 10.0, **_serial_options):
        self.url = parse_url(url)
        self.key, self.queue, self.on_command = key, queue, on_command
        self.report = report or (lambda kind, **fields: None)
        self.batch, self.ack_timeout_s = batch, ack_timeout_s
        self.device = f"{queue.stream_id:08x}"
        self.stats = LinkStats()
        self.rejected_commands = 0
        self._commands: list[bytes] = []
        self._lock = threading.Lock()
        status = self.url.topic(self.device, "status")
        self.conn = Connection(self.url, f"edge-sdk-{self.device}", will=(status, b"offline"),
                               subscribe=(self.url.topic(self.device, "command"),),
                               on_connect=self._on_connect, on_message=self._on_message)

    def _on_connect(self) -> None:
        self.conn.client.publish(self.url.topic(self.device, "status"), b"online", qos=QOS, retain=True)

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._lock:
            if len(self._commands) < 64:
                self._commands.append(payload)

    def run(self, stop: threading.Event, *, drained: threading.Event | None = None) -> None:
        self.conn.start()
        try:
            while not stop.is_set():
                busy = self.step(drained)
                if not busy:
                    stop.wait(0.05)
        finally:
            self.conn.client.publish(self.url.topic(self.device, "status"), b"offline", qos=QOS, retain=True)
            self.conn.stop()

    def step(self, drained: threading.Event | None = None) -> bool:
        """Run queued commands, publish one batch; True when there was work."""
        did = self._run_commands()
        records = self.queue.pending(self.queue.acked, self.batch)
        if not records:
            if drained is not None:
                drained.set()
            return did
        schemas = self.queue.schemas()
        messages = [(self.url.topic(self.device, KINDS.get(r.kind, str(r.kind))), _dumps(record_row(self.queue.stream_id, r, schemas)), False)
                    for r in records]
        if not self.conn.publish_all(messages, self.ack_timeout_s):
            self.stats.timeouts += 1
            return False
        self.queue.ack(records[-1].seq)
        self.stats.acks += 1
        return True

    def _run_commands(self) -> bool:
        with self._lock:
            payloads, self._commands = self._commands, []
        for payload in payloads:
            frame = self._verified_command(payload)
            if frame is None or self.on_command is None:
                continue
            result = self.on_command(frame)
            if result and result[0] == REPLAY:
                self.report("command_rejected", reason=f"replayed counter {frame.seq}", transport="mqtt")
            if result is not None:
                out = wire.encode(wire.Frame(wire.FrameType.RESULT, self.queue.stream_id, frame.seq, int(time.time() * 1000), result), self.key)
                self.conn.client.publish(self.url.topic(self.device, "result"), out, qos=QOS)
        return bool(payloads)

    def _verified_command(self, payload: bytes) -> wire.Frame | None:
        try:
            frame = wire.decode(payload.strip(b"\x00"), self.key)
            if frame.type != wire.FrameType.COMMAND or frame.stream != self.queue.stream_id:
                raise wire.FrameError("not a COMMAND frame for this device")
        except wire.FrameError as exc:
            self.rejected_commands += 1
            self.stats.bad_frames += 1
            log.warning("MQTT command dropped: %s", exc)
            self.report("command_rejected", reason=str(exc)[:200], transport="mqtt")
            return None
        return frame


class MqttCommander:
    """The ground's end of MQTT downlink commands (frames as `GroundStation.command_frame` makes them)."""

    def __init__(self, url: str, key: bytes):
        self.url = parse_url(url)
        self.key = key
        self._results: dict[int, bytes] = {}
        self._cv = threading.Condition()
        self.conn = Connection(self.url, f"edge-sdk-ground-{uuid.uuid4().hex[:8]}", on_message=self._on_message,
                               subscribe=(self.url.topic("+", "result"),)).start()

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            frame = wire.decode(payload.strip(b"\x00"), self.key)
        except wire.FrameError as exc:
            log.warning("MQTT result dropped: %s", exc)
            return
        with self._cv:
            self._results[frame.seq] = frame.payload
            self._cv.notify_all()

    def send(self, frame: wire.Frame, timeout_s: float = 10.0, raw: bytes | None = None) -> bytes:
        """Publish a COMMAND frame (or raw bytes, to test the device's checks) and wait for its RESULT payload."""
        if not self.conn.connected.wait(timeout_s):
            raise TelemetryError(f"MQTT broker {self.url.host}:{self.url.port} not reachable", hint="check the broker and the URL")
        device = f"{frame.stream:08x}"
        with self._cv:
            self._results.pop(frame.seq, None)
        self.conn.client.publish(self.url.topic(device, "command"), raw if raw is not None else wire.encode(frame, self.key), qos=QOS)
        with self._cv:
            if not self._cv.wait_for(lambda: frame.seq in self._results, timeout_s):
                raise TelemetryError(f"no result for command {frame.seq} within {timeout_s:.0f} s",
                                     hint="check that the device's uplink is connected and uses the same key")
            return self._results.pop(frame.seq)

    def close(self) -> None:
        self.conn.stop()


class MqttExporter:
    """Publish the rows `telemetry listen` stored (JSONL) to MQTT; the offset of the last row the
    broker acknowledged is kept beside the file, so a restart or an outage resumes without loss."""

    def __init__(self, url: str, source: str | os.PathLike, *, batch: int = 256, ack_timeout_s: float = 10.0):
        self.url = parse_url(url)
        self.source = Path(source)
        self.cursor = ExportCursor(self.source, "mqtt-offset")
        self.batch, self.ack_timeout_s = batch, ack_timeout_s
        self.exported = 0
        self.conn = Connection(self.url, f"edge-sdk-export-{uuid.uuid4().hex[:8]}")

    def offset(self) -> int:
        return self.cursor.offset()

    def step(self) -> int:
        """Publish the next complete rows; returns how many the broker acknowledged (0: nothing new, or broker away)."""
        offset, lines = self.cursor.complete_rows(self.batch)
        messages = []
        for line in lines:
            try:
                row = json.loads(line)
                messages.append((self.url.topic(str(row["stream"]), str(row["kind"])), line.rstrip(b"\n"), False))
            except (ValueError, KeyError, TypeError):
                log.warning("%s: row at byte %d is not a telemetry row: skipped", self.source, offset)
        if not lines or (messages and not self.conn.publish_all(messages, self.ack_timeout_s)):
            return 0
        self.cursor.save(offset + sum(len(ln) for ln in lines))
        self.exported += len(messages)
        return len(messages)

    def run(self, stop: threading.Event, poll_s: float = 0.2) -> None:
        self.conn.start()
        try:
            while not stop.is_set():
                if not self.step():
                    stop.wait(poll_s)
        finally:
            self.conn.stop()
