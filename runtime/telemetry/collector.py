"""Collector: platform readings and runtime metrics every interval, events as they happen.

Readings come from a callable returning a flat or nested dict (the platform layer's snapshot when
it is installed, /proc otherwise); runtime metrics and events come from the daemon through the
thread-safe ``record_metric``/``count``/``event``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from edge_sdk.errors import ConfigError, EdgeSDKError

from .queue import TelemetryQueue
from .records import KIND_IDS

log = logging.getLogger(__name__)

# priorities: a full queue drops the lowest first, oldest first within one
SAMPLE, EVENT, ALERT = 10, 100, 200
Readings = Callable[[], dict]


def flatten(value: Any, prefix: str = "", out: dict | None = None) -> dict:
    """Nested dicts, lists and dataclasses to ``{"a.b.0.c": scalar}``."""
    out = {} if out is None else out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(v, f"{prefix}{k}.", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            flatten(v, f"{prefix}{i}.", out)
    elif value is None or isinstance(value, (bool, int, float, str)):
        out[prefix[:-1]] = value
    else:
        out[prefix[:-1]] = str(value)
    return out


def proc_readings(root: str | os.PathLike = "/") -> Readings:
    """Readings any Linux has: load, memory (kB), thermal zones (m°C)."""
    root = Path(root)

    def read() -> dict:
        out: dict = {}
        try:
            out["load1"] = float((root / "proc/loadavg").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        try:
            for line in (root / "proc/meminfo").read_text().splitlines():
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable", "NvMapMemUsed", "SwapFree"):
                    out[f"mem.{name}_kb"] = int(rest.split()[0])
        except (OSError, ValueError, IndexError):
            pass
        for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
            try:
                out[f"temp_mc.{(zone / 'type').read_text().strip()}"] = int((zone / "temp").read_text())
            except (OSError, ValueError):
                continue
        return out

    return read


def platform_readings(emulate: str | None = None, root: str | None = None) -> Readings:
    """The platform layer's snapshot; /proc readings when it cannot start."""
    from edge_sdk.runtime.platform import Platform

    try:
        plat = Platform.from_options(emulate=emulate, root=root)
    except EdgeSDKError as exc:
        log.warning("platform layer unavailable (%s): reporting /proc readings", exc)
        return proc_readings(root or "/")

    def read() -> dict:
        snap = plat.snapshot()
        fields = flatten(snap)
        fields.pop("stamp", None)
        return fields

    return read


class Telemetry:
    """What the device reports. Thread-safe: the daemon records from any thread."""

    def __init__(self, queue: TelemetryQueue, readings: Readings | None = None, interval: float = 5.0,
                 clock: Callable[[], float] = time.time):
        self.queue = queue
        self.readings = readings
        self.interval = self._check_interval(interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._gauges: dict[str, Any] = {}
        self._counters: dict[str, int] = {}
        self._wake = threading.Event()

    @staticmethod
    def _check_interval(seconds: float) -> float:
        if not 0.01 <= seconds <= 86400:
            raise ConfigError(f"telemetry interval {seconds} s out of range", hint="use 0.01 to 86400 seconds")
        return float(seconds)

    def set_interval(self, seconds: float) -> float:
        self.interval = self._check_interval(seconds)
        self._wake.set()
        return self.interval

    def record_metric(self, name: str, value: float | int | str | None) -> None:
        """Latest value of a gauge (tokens/s, time to first token, queue depth, KV usage...)."""
        with self._lock:
            self._gauges[name] = value

    def count(self, name: str, n: int = 1) -> None:
        """Add to a counter (requests, errors, refused requests...)."""
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def event(self, kind: str, priority: int = EVENT, **fields) -> int:
        """Store an event now (mode change, thermal step, refused request, error); returns its seq."""
        record = {"event": kind, **{k: v for k, v in fields.items()}}
        return self.queue.add([(flatten(record), KIND_IDS["event"], priority, self._now_ms())])[0]

    def sample(self, priority: int = SAMPLE) -> int:
        """Store one sample of readings and metrics now; returns its seq."""
        record: dict = {}
        if self.readings is not None:
            try:
                record.update(flatten(self.readings()))
            except (EdgeSDKError, OSError) as exc:
                log.warning("platform readings failed: %s", exc)
                record["readings_error"] = str(exc)
        with self._lock:
            record.update({f"metric.{k}": v for k, v in self._gauges.items()})
            record.update({f"count.{k}": v for k, v in self._counters.items()})
        record["queue.dropped"] = self.queue.dropped
        return self.queue.add([(record, KIND_IDS["sample"], priority, self._now_ms())])[0]

    def run(self, stop: threading.Event) -> None:
        """Sample every interval until stop is set."""
        next_t = time.monotonic()
        while not stop.is_set():
            try:
                self.sample()
            except EdgeSDKError as exc:
                log.error("telemetry sample not stored: %s", exc)
            next_t += self.interval
            self._wake.clear()
            while not stop.is_set() and not self._wake.is_set() and time.monotonic() < next_t:
                stop.wait(min(0.2, max(0.0, next_t - time.monotonic())))
            if self._wake.is_set() or time.monotonic() > next_t + self.interval:
                next_t = time.monotonic()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)
