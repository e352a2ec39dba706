"""A loopback TCP port for a server the tests start (and may restart on the same port).

Below the kernel's ephemeral range: no outgoing connection is ever given it as its local port while the
server is down (a port from bind(("127.0.0.1", 0)) can be, between the pick and a restart's bind)."""

from __future__ import annotations

import random
import socket


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nobody listens on now, outside the ephemeral range where the kernel leaves room for one."""
    low = _ephemeral_low()
    if low > 12000:
        rng = random.Random()  # independent of any seed a test sets
        for _ in range(200):
            port = rng.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
