"""The `update` downlink command: authenticated like every command, it starts the updater with the URL."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

from edge_sdk.runtime.fleet.trigger import UpdateLauncher
from edge_sdk.runtime.telemetry.commands import CommandHandler, Status, decode_result, encode_command
from edge_sdk.runtime.telemetry.queue import TelemetryQueue


def test_update_command_starts_the_updater_once(tmp_path):
    out = tmp_path / "argv"
    script = f"import sys, pathlib; pathlib.Path({str(out)!r}).write_text(' '.join(sys.argv[1:]))"
    launcher = UpdateLauncher((sys.executable, "-c", script), ("--config", "/etc/x.toml"))
    handler = CommandHandler(TelemetryQueue(tmp_path / "q.sqlite"), {"update": launcher})
    frame = SimpleNamespace(seq=7, payload=encode_command("update", ("http://127.0.0.1:9/b.tar.gz",)))
    r = decode_result(7, handler(frame))
    assert r.status == Status.OK and r.value == "started"
    deadline = time.monotonic() + 60  # a process start on a loaded machine; the file is written in one go
    while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.read_text() == "http://127.0.0.1:9/b.tar.gz --config /etc/x.toml"
    out.unlink()
    assert decode_result(6, handler(SimpleNamespace(seq=6, payload=frame.payload))).status == Status.REPLAY
    assert handler.executed == 1


def test_update_command_refuses_what_is_not_a_url(tmp_path):
    launcher = UpdateLauncher((sys.executable, "-c", "raise SystemExit(3)"))
    handler = CommandHandler(TelemetryQueue(tmp_path / "q.sqlite"), {"update": launcher})
    r = decode_result(1, handler(SimpleNamespace(seq=1, payload=encode_command("update", ("/etc/passwd; reboot",)))))
    assert r.status == Status.FAILED and "not an http(s) URL" in r.message
