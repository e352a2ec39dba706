"""`edge-sdk telemetry` as real processes: kill -9 the uplink mid-stream, commands, keys, status."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time

import pytest

from edge_sdk.runtime.telemetry.linesim import PtyLine, SocketLine
from edge_sdk.runtime.telemetry.queue import TelemetryQueue

CLI = [sys.executable, "-m", "edge_sdk.cli.main", "telemetry"]
WAIT_S = 60  # bound on waits for processes and the link: generous for a loaded machine, still a failure


def cli(*args, **kw):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=2 * WAIT_S, **kw)


def spawn(*args, **kw):
    return subprocess.Popen(CLI + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "link.key"
    assert cli("keygen", path).returncode == 0
    return path


def test_keygen_writes_a_private_key_once(tmp_path, key):
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 32
    again = cli("keygen", key)
    assert again.returncode == 9 and "already exists" in again.stderr


def test_bad_key_file_names_the_fix(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("abcd\n")
    res = cli("listen", "loop://", "--key", bad, "--seconds", "0.1")
    assert res.returncode == 9 and "keygen" in res.stderr and "2 bytes" in res.stderr


def wait_until_sent(state_dir, minimum, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = state_dir / "telemetry.sqlite"
        if path.exists():
            q = TelemetryQueue(path)
            stats = q.stats()
            q.close()
            if stats["acked"] >= minimum:
                return stats
        time.sleep(0.1)
    raise AssertionError(f"fewer than {minimum} records acknowledged in {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("line_cls,kills", [(PtyLine, 3), (SocketLine, 4)])
def test_kill_9_uplink_repeatedly_every_seq_exactly_once(tmp_path, key, line_cls, kills):
    rng = random.Random(7)
    state, out = tmp_path / "state", tmp_path / "out.jsonl"
    uplink_args = ("uplink", None, "--key", key, "--state-dir", state, "--interval", "0.02", "--flush-timeout", str(2 * WAIT_S),
                   "--link-budget", "1200")  # backlogged: kills land with frames in flight
    with line_cls() as line:
        ground = spawn("listen", line.b, "--key", key, "--out", out, "--json")
        acked = 0
        for _ in range(kills):
            up = spawn(*uplink_args[:1], line.a, *uplink_args[2:])
            wait_until_sent(state, acked + 1)  # this run is streaming
            time.sleep(rng.uniform(0.3, 0.8))
            up.send_signal(signal.SIGKILL)
            up.communicate(timeout=WAIT_S)
            acked = wait_until_sent(state, 0)["acked"]
        up = spawn(*uplink_args[:1], line.a, *uplink_args[2:], "--json")
        wait_until_sent(state, acked + 1)
        up.send_signal(signal.SIGTERM)  # stop sampling, flush the queue, exit
        up_out, up_err = up.communicate(timeout=3 * WAIT_S)
        assert up.returncode == 0, up_err
        assert json.loads(up_out)["flushed"] is True
        ground.send_signal(signal.SIGTERM)
        g_out, g_err = ground.communicate(timeout=WAIT_S)
    q = TelemetryQueue(state / "telemetry.sqlite")
    stats = q.stats()
    q.close()
    seqs = [json.loads(line)["seq"] for line in open(out)]
    assert stats["dropped"] == 0 and stats["records"] == 0
    assert sorted(seqs) == list(range(1, stats["last_seq"] + 1)), "missing or repeated sequence numbers"
    assert seqs == sorted(seqs)
    summary = json.loads(g_out)
    (stream,) = summary["streams"].values()
    assert stream["records"] == stats["last_seq"] and summary["frames"]["auth_failures"] == 0


def test_send_command_and_status(tmp_path, key):
    state = tmp_path / "state"
    with PtyLine() as line:
        up = spawn("uplink", line.a, "--key", key, "--state-dir", state, "--interval", "0.5", "--flush-timeout", "0")
        try:
            res = cli("send-command", "--port", line.b, "--key", key, "--counter-file", tmp_path / "counter", "--timeout", WAIT_S,
                      "--json", "snapshot")
            assert res.returncode == 0, res.stderr
            result = json.loads(res.stdout)
            assert result["status"] == "ok" and isinstance(result["value"], int)
            bad = cli("send-command", "--port", line.b, "--key", key, "--counter-file", tmp_path / "counter", "set-interval", "x")
            assert bad.returncode == 9 and "bad argument" in bad.stderr
        finally:
            up.send_signal(signal.SIGTERM)
            up.communicate(timeout=WAIT_S)
    assert int((tmp_path / "counter").read_text()) == result["counter"]
    status = cli("status", "--state-dir", state, "--json")
    stats = json.loads(status.stdout)
    assert stats["last_seq"] >= result["value"] and stats["acked"] == 0  # nobody acknowledged: all queued
    assert stats["records"] == stats["last_seq"]


def test_commands_through_a_running_listener(tmp_path, key):
    spool, out = tmp_path / "spool", tmp_path / "out.jsonl"
    with PtyLine() as line:
        up = spawn("uplink", line.a, "--key", key, "--state-dir", tmp_path / "state", "--interval", "0.2",
                   "--flush-timeout", WAIT_S)
        ground = spawn("listen", line.b, "--key", key, "--out", out, "--commands", spool,
                       "--counter-file", tmp_path / "counter", "--json")
        try:
            wait_until_sent(tmp_path / "state", 1)
            res = cli("send-command", "--via", spool, "--timeout", WAIT_S, "--json", "set-interval", "0.5")
            assert res.returncode == 0, res.stderr
            assert json.loads(res.stdout)["status"] == "ok"
            snap = json.loads(cli("send-command", "--via", spool, "--timeout", WAIT_S, "--json", "snapshot").stdout)
            assert snap["status"] == "ok"
        finally:
            up.send_signal(signal.SIGTERM)
            up.communicate(timeout=2 * WAIT_S)
            ground.send_signal(signal.SIGTERM)
            ground.communicate(timeout=WAIT_S)
    rows = [json.loads(line) for line in open(out)]
    assert snap["value"] in [r["seq"] for r in rows]  # the snapshot it took reached the ground
    assert list(spool.iterdir()) == []


def test_telemetry_never_imports_torch_or_transformers():
    code = ("import sys, edge_sdk.cli.telemetry, edge_sdk.runtime.telemetry.uplink, edge_sdk.runtime.telemetry.ground, "
            "edge_sdk.runtime.telemetry.linesim; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr
