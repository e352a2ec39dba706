"""A simulated serial line between two endpoints, for tests, benchmarks and bench setups.

``PtyLine`` joins two pty pairs (each endpoint opens its slave name with pyserial, as it would a
UART); ``SocketLine`` joins two TCP ports on 127.0.0.1 (endpoints open ``socket://127.0.0.1:PORT``
and may reconnect). Bytes are copied both ways by one thread, optionally through ``Noise`` (bit
flips and injected garbage), and every chunk is logged with its time to measure rates.
"""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time
import tty
from dataclasses import dataclass, field


@dataclass
class Noise:
    flip_rate: float = 0.0  # probability that a byte has one bit flipped
    garbage_rate: float = 0.0  # probability that a byte is followed by 1-24 random bytes
    seed: int = 0
    flipped: int = 0
    injected: int = 0
    _rng: random.Random = field(default=None, repr=False)

    def apply(self, data: bytes) -> bytes:
        if self._rng is None:
            self._rng = random.Random(self.seed)
        rng, out = self._rng, bytearray()
        for byte in data:
            if self.flip_rate and rng.random() < self.flip_rate:
                byte ^= 1 << rng.randrange(8)
                self.flipped += 1
            out.append(byte)
            if self.garbage_rate and rng.random() < self.garbage_rate:
                junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 25)))
                out += junk
                self.injected += len(junk)
        return bytes(out)


class _Line:
    def __init__(self, noise_ab: Noise | None = None, noise_ba: Noise | None = None):
        self.noise = {"ab": noise_ab, "ba": noise_ba}
        self.log: dict[str, list[tuple[float, int]]] = {"ab": [], "ba": []}  # (monotonic s, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="linesim")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _pass(self, direction: str, data: bytes) -> bytes:
        self.log[direction].append((time.monotonic(), len(data)))
        noise = self.noise[direction]
        return noise.apply(data) if noise else data

    def bytes_between(self, direction: str, t0: float, t1: float) -> int:
        return sum(n for t, n in self.log[direction] if t0 <= t < t1)


class PtyLine(_Line):
    """Two pty pairs joined at their masters; ``a`` and ``b`` are the slave device names."""

    def __init__(self, noise_ab: Noise | None = None, noise_ba: Noise | None = None):
        super().__init__(noise_ab, noise_ba)
        self._masters, self._slaves, names = [], [], []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)
            os.set_blocking(master, False)
            self._masters.append(master)
            self._slaves.append(slave)  # held open: the master would read EIO while no endpoint holds it
            names.append(os.ttyname(slave))
        self.a, self.b = names

    def _loop(self) -> None:
        ma, mb = self._masters
        peer = {ma: (mb, "ab"), mb: (ma, "ba")}
        while not self._stop.is_set():
            ready, _, _ = select.select([ma, mb], [], [], 0.05)
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except (BlockingIOError, OSError):
                    continue
                out, direction = peer[fd]
                data = self._pass(direction, data)
                while data:
                    try:
                        data = data[os.write(out, data):]
                    except BlockingIOError:
                        select.select([], [out], [], 0.05)
                    except OSError:
                        break

    def close(self) -> None:
        super().close()
        for fd in self._masters + self._slaves:
            os.close(fd)


class SocketLine(_Line):
    """Two TCP listeners on 127.0.0.1; ``a`` and ``b`` are pyserial socket:// URLs. A new connection
    on a side replaces the old one (an endpoint that restarts); bytes for an absent side are lost."""

    def __init__(self, noise_ab: Noise | None = None, noise_ba: Noise | None = None):
        super().__init__(noise_ab, noise_ba)
        self._listeners = []
        urls = []
        for _ in range(2):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            s.listen(4)
            self._listeners.append(s)
            urls.append(f"socket://127.0.0.1:{s.getsockname()[1]}")
        self.a, self.b = urls
        self._conns: list[socket.socket | None] = [None, None]

    def _loop(self) -> None:
        while not self._stop.is_set():
            conns = [c for c in self._conns if c is not None]
            ready, _, _ = select.select(self._listeners + conns, [], [], 0.05)
            for s in ready:
                if s in self._listeners:
                    side = self._listeners.index(s)
                    conn, _ = s.accept()
                    if self._conns[side] is not None:
                        self._conns[side].close()
                    self._conns[side] = conn
                    continue
                if s not in self._conns:
                    continue
                side = self._conns.index(s)
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    s.close()
                    self._conns[side] = None
                    continue
                data = self._pass("ab" if side == 0 else "ba", data)
                other = self._conns[1 - side]
                if other is not None:
                    try:
                        other.sendall(data)
                    except OSError:
                        other.close()
                        self._conns[1 - side] = None

    def close(self) -> None:
        super().close()
        for s in self._listeners + [c for c in self._conns if c is not None]:
            s.close()
