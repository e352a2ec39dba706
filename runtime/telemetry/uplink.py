"""The device-side service: collector + persistent queue + link + downlink commands.

``edge-sdk telemetry uplink`` runs it alone; the daemon runs the same ``Uplink`` beside the API and
records its metrics through ``uplink.telemetry``.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.errors import ConfigError, PlatformError, TelemetryError

from .collector import ALERT, EVENT, Readings, Telemetry, platform_readings
from .commands import CommandHandler
from .link import Sender
from .queue import TelemetryQueue

log = logging.getLogger(__name__)
KEY_BYTES = 32


def state_dir(explicit: str | os.PathLike | None, env: Mapping[str, str], is_root: bool) -> Path:
    """--state-dir, else env EDGE_SDK_STATE_DIR, else /var/lib/edge-sdk for root (the service), else XDG
    (`env` is the CLI's environment)."""
    if explicit:
        return Path(explicit)
    if env.get("EDGE_SDK_STATE_DIR"):
        return Path(env["EDGE_SDK_STATE_DIR"])
    if is_root:
        return Path("/var/lib/edge-sdk")
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "edge-sdk"


def generate_key(path: str | os.PathLike) -> Path:
    """Write a new pre-shared key (hex, mode 0600); refuses to overwrite one."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise TelemetryError(f"{path} already exists", hint="remove it first or choose another file") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(KEY_BYTES) + "\n")
    return path


def load_key(path: str | os.PathLike) -> bytes:
    try:
        text = Path(path).read_bytes().decode("ascii", errors="replace").strip()
    except OSError as exc:
        raise TelemetryError(f"cannot read key file {path}: {exc}",
                             hint="create one with: edge-sdk telemetry keygen FILE") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise TelemetryError(f"key file {path} is not hex: the key must be the hex text that `edge-sdk telemetry keygen` writes",
                             hint="create one with: edge-sdk telemetry keygen FILE") from None
    if len(key) < 16:
        raise TelemetryError(f"key in {path} has {len(key)} bytes; at least 16 are needed",
                             hint="create one with: edge-sdk telemetry keygen FILE")
    return key


@dataclass
class UplinkSettings:
    url: str
    key: bytes
    state_dir: Path
    interval: float = 5.0  # s between samples
    link_budget: float | None = None  # B/s the device may write; None = no limit
    queue_bytes: int = 16 << 20
    window: int = 8
    max_frame: int = 1024

    def __post_init__(self):
        if self.link_budget is not None and self.link_budget < 100:
            raise ConfigError(f"link budget {self.link_budget} B/s is too low", hint="use at least 100 B/s")
        if self.interval <= 0:
            raise ConfigError(f"interval {self.interval} s must be positive")


class Uplink:
    def __init__(self, settings: UplinkSettings, readings: Readings | None = None, power=None, update=None):
        self.settings = settings
        self.queue = TelemetryQueue(settings.state_dir / "telemetry.sqlite", settings.queue_bytes)
        self.power = power  # a platform PowerManager: set-power-mode, and the mode in every sample
        self._mode = None
        if power is not None:
            try:
                self._mode = power.current().name
            except PlatformError as exc:
                log.warning("cannot read the power mode: %s", exc)
            power.subscribe(self._on_mode_change)
        self.telemetry = Telemetry(self.queue, self._with_mode(readings), settings.interval)
        self.commands = CommandHandler(self.queue, {
            "set-interval": self.telemetry.set_interval,
            "snapshot": lambda: self.telemetry.sample(priority=EVENT),
            "set-power-mode": self._set_power_mode,
            **({"update": update} if update else {}),  # starts an OTA update (edge_sdk.runtime.fleet.trigger)
        })
        if settings.url.startswith("mqtt://"):  # direct uplink to a broker (docs/fleet.md)
            from .mqtt import MqttSender

            self.sender = MqttSender(settings.url, settings.key, self.queue, on_command=self.commands,
                                     report=lambda kind, **f: self.telemetry.event(kind, **f))
        else:
            self.sender = Sender(settings.url, settings.key, self.queue, budget=settings.link_budget,
                                 window=settings.window, max_frame=settings.max_frame, on_command=self.commands)
        self.drained = threading.Event()
        self._stop_collect = threading.Event()
        self._stop_link = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_options(cls, settings: UplinkSettings, emulate: str | None = None, root: str | None = None, update=None) -> "Uplink":
        power = None
        try:
            from edge_sdk.runtime.platform import Platform, PowerManager
            power = PowerManager(Platform.from_options(emulate=emulate, root=root))
        except (ImportError, PlatformError) as exc:
            log.warning("power modes unavailable to downlink commands: %s", exc)
        return cls(settings, platform_readings(emulate, root), power, update)

    def _with_mode(self, readings: Readings | None) -> Readings | None:
        if self.power is None:
            return readings
        return lambda: {**(readings() if readings else {}), "nvpmodel_mode": self._mode}

    def _on_mode_change(self, change) -> None:
        self._mode = change.new
        self.telemetry.event("power_mode", ALERT, **change.to_dict())

    def _set_power_mode(self, mode: str):
        if self.power is None:
            raise PlatformError("no platform layer on this device", hint="run the uplink with --emulate BOARD or on a Jetson")
        change = self.power.set(int(mode) if mode.isdigit() else mode, reason="downlink command")
        return change.new if change else self._mode

    def start(self) -> "Uplink":
        for target, stop, kw in ((self.telemetry.run, self._stop_collect, {}),
                                 (self.sender.run, self._stop_link, {"drained": self.drained})):
            t = threading.Thread(target=target, args=(stop,), kwargs=kw, daemon=True, name=f"telemetry-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self, flush_timeout: float = 5.0) -> bool:
        """Stop sampling, send what is queued for up to flush_timeout s, stop. True if all was acknowledged."""
        self._stop_collect.set()
        self.drained.clear()
        flushed = self.drained.wait(flush_timeout)
        self._stop_link.set()
        for t in self._threads:
            t.join(timeout=5)
        self.queue.close()
        return flushed
