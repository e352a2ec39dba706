"""sd_notify without libsystemd: READY / WATCHDOG / STOPPING / STATUS datagrams to $NOTIFY_SOCKET.

The protocol: one AF_UNIX datagram of newline-separated KEY=VALUE lines. A socket path starting
with '@' is in the abstract namespace (leading NUL byte). WATCHDOG_USEC (and WATCHDOG_PID, when
set, must be our pid) tells how often systemd expects WATCHDOG=1; we send it every half period.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Talks to systemd when started by it; every call is a no-op otherwise."""

    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_usec = _watchdog_usec(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the configured timeout), or None without a watchdog."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, **fields) -> bool:
        """Send e.g. notify(READY=1, STATUS="serving"). Returns True when a datagram was sent."""
        if self.address is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(payload, self.address)
            return True
        except OSError as exc:  # systemd gone or socket removed: the service keeps running
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid()) if status else self.notify(READY=1, MAINPID=os.getpid())

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def reloading(self) -> bool:
        return self.notify(RELOADING=1)

    def stopping(self, status: str = "") -> bool:
        return self.notify(STOPPING=1, STATUS=status) if status else self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; not notifying systemd", value)
    return None


def _watchdog_usec(env) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec
