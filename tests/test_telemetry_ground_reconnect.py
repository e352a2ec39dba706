"""The ground listener survives its serial port disappearing (USB adapter unplugged) and coming back:
one warning per outage, the stream state kept, every record written exactly once."""

import logging
import os
import select
import subprocess
import sys
import threading
import time
import tty

import pytest

from edge_sdk.runtime.telemetry import records
from edge_sdk.runtime.telemetry.ground import GroundStation
from edge_sdk.runtime.telemetry.link import Sender
from test_telemetry_cli import CLI
from test_telemetry_link import KEY, WAIT_S, check_exactly_once, expected_rows, fill, read_out, running, wait_for

GROUND_LOG = "edge_sdk.runtime.telemetry.ground"


class UnpluggableLine:
    """The device on one pty pair; the ground on a second pair reached through a symlink, as a USB
    adapter is through /dev/serial/by-id/... `unplug()` destroys the ground's pair (its open port
    reads EIO, the name is gone); `plug()` creates a new pair behind the same name."""

    def __init__(self, tmp_path):
        self.ma, self._sa = self._pair()
        self.a = os.ttyname(self._sa)
        self.b = str(tmp_path / "ttyUSB-ground")
        self._lock = threading.Lock()
        self._mb = self._sb = None
        self.dropped = 0  # device bytes that fell on the floor while unplugged
        self._stop = threading.Event()
        self.plug()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _pair():
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        return master, slave

    def plug(self):
        mb, sb = self._pair()
        tmp = self.b + ".new"
        os.symlink(os.ttyname(sb), tmp)
        os.replace(tmp, self.b)
        with self._lock:
            self._mb, self._sb = mb, sb

    def unplug(self):
        with self._lock:
            mb, sb, self._mb, self._sb = self._mb, self._sb, None, None
            os.unlink(self.b)
            os.close(mb)
            os.close(sb)

    def _loop(self):
        while not self._stop.is_set():
            with self._lock:
                fds = [self.ma] + ([self._mb] if self._mb is not None else [])
                ready, _, _ = select.select(fds, [], [], 0.02)
                for fd in ready:
                    try:
                        data = os.read(fd, 65536)
                    except OSError:
                        continue
                    out = self._mb if fd == self.ma else self.ma
                    if out is None:
                        self.dropped += len(data)
                        continue
                    try:
                        os.write(out, data)
                    except OSError:
                        pass
            time.sleep(0.001)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=WAIT_S)
        for fd in (self.ma, self._sa, self._mb, self._sb):
            if fd is not None:
                os.close(fd)


@pytest.fixture
def line(tmp_path):
    line = UnpluggableLine(tmp_path)
    yield line
    line.close()


def more(q, tel, want, n):
    """n more records into the device queue, and into what the ground must write (called with the
    ground away: none of them can be acknowledged, and so forgotten, before they are read back here)."""
    later = {tel.sample() for _ in range(n)}
    want.update({r.seq: records.decode_record(r.body, q.schemas()) for r in q.pending(0, 100000) if r.seq in later})


def outage(line, gone_s, meanwhile=lambda: None):
    line.unplug()
    meanwhile()
    time.sleep(gone_s)  # long enough for the ground to try reopening a missing name
    line.plug()


@pytest.mark.parametrize("gone_s", [0.05, 0.8])
def test_records_before_and_after_outages_arrive_once(tmp_path, line, caplog, gone_s):
    q, tel = fill(tmp_path, 120)
    want = expected_rows(q)
    out = tmp_path / "out.jsonl"
    outages = 3
    sender = Sender(line.a, KEY, q, budget=6000, rto=0.3)  # slow enough for outages mid-stream
    ground = GroundStation(line.b, KEY, out)
    with caplog.at_level(logging.INFO, logger=GROUND_LOG), running((sender.run, {}), (ground.run, {})):
        for i in range(outages):
            # the ground is back on the port (an ACK still on the device's line could otherwise stand in)
            assert wait_for(lambda: ground.stats.reconnects == i, WAIT_S), f"the ground did not reopen after outage {i}"
            acked = q.acked
            assert wait_for(lambda: q.acked > acked, WAIT_S), f"nothing acknowledged before outage {i + 1}"
            outage(line, gone_s, lambda: more(q, tel, want, 40))  # data after every outage, however fast the rest went
        assert wait_for(lambda: q.acked == max(want), WAIT_S), "records after the outages did not arrive"
        assert wait_for(lambda: ground.stats.reconnects == outages, WAIT_S), "the ground did not reopen after the last outage"
    ground.close()
    check_exactly_once(q, out, want)
    assert [r["seq"] for r in read_out(out)] == list(range(1, max(want) + 1))
    warnings = [r for r in caplog.records if r.name == GROUND_LOG and r.levelno >= logging.WARNING]
    assert len(warnings) == outages and all(r.exc_info is None for r in warnings)
    assert all("lost" in r.getMessage() for r in warnings)
    assert ground.stats.reconnects == outages
    assert ground.summary()["frames"]["reconnects"] == outages


def test_listen_command_survives_an_unplugged_port(tmp_path, line):
    q, _ = fill(tmp_path, 150)
    want = expected_rows(q)
    key = tmp_path / "key"
    key.write_text(KEY.hex())
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(CLI + ["listen", line.b, "--key", str(key),
                             "--out", str(out), "--seconds", "600"], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(s) for s in proc.stderr], daemon=True)  # line by line
    reader.start()
    try:
        sender = Sender(line.a, KEY, q, budget=4000, rto=0.3)
        with running((sender.run, {})):
            assert wait_for(lambda: q.acked > 0, WAIT_S)
            outage(line, 0.5)
            assert wait_for(lambda: q.acked == max(want), WAIT_S), "the listener did not come back"
            assert wait_for(lambda: any("is back" in s for s in lines), WAIT_S), "the listener did not reopen the port"
    finally:
        proc.terminate()
        proc.wait(WAIT_S)
        reader.join(WAIT_S)
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "SerialException" not in err
    assert sum("lost" in line for line in err.splitlines()) == 1 and "port outages survived 1" in err
    check_exactly_once(q, out, want)


def test_command_sent_across_an_outage_runs_once_and_its_replay_is_refused(tmp_path, line):
    from test_telemetry_link import device

    from edge_sdk.runtime.telemetry.commands import Status

    q, tel, handler, sender = device(tmp_path, line.a)
    ground = GroundStation(line.b, KEY, tmp_path / "out.jsonl", counter_file=tmp_path / "counter")
    with running((sender.run, {}), (ground.run, {})):
        frame = ground.command_frame(q.stream_id, "set-interval", 2.5)
        line.unplug()
        threading.Timer(0.6, line.plug).start()
        res = ground.send_command(0, "", frame=frame, timeout=WAIT_S, retry=0.2)  # written into a dead port first
        assert (res.status, tel.interval, handler.executed) == (Status.OK, 2.5, 1)
        outage(line, 0.3)
        assert ground.send_command(0, "", frame=frame, timeout=WAIT_S, retry=0.2).status == Status.OK
        assert handler.executed == 1  # the stored result, not a second run
    ground.close()
    assert ground.stats.reconnects == 2


def test_a_port_closed_by_a_failed_write_during_a_read_does_not_stop_the_ground(tmp_path):
    """pyserial's read on a port another thread closed raises TypeError (its fd is None): the ground's
    loop must take it as the outage the writer already reported, then reopen."""
    opened = []

    class Port:
        in_waiting = 0

        def __init__(self):
            opened.append(self)

        def read(self, n):
            if len(opened) == 1:  # the writer notices the dead line while this read waits
                ground._lost(self, OSError("write failed"))
                self.fd = None
                return os.read(self.fd, n)
            return b""

        def write(self, data):
            return len(data)

        def close(self):
            pass

    ground = GroundStation("loop://", KEY, tmp_path / "out.jsonl", port_factory=lambda url: Port())
    ground.poll()  # raised TypeError before: the ground's thread died and every later command timed out
    ground._retry_at = 0
    ground.poll()
    assert len(opened) == 2 and ground.stats.reconnects == 1
