"""examples/demo.py, the one-command demo: convert the tiny model, serve it emulated, chat, stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, str(DEMO), "--keep", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "reply (" in out and "identical to the reply: True" in out and "daemon exited with status 0" in out
    log = (tmp_path / "demo" / "daemon.log").read_text()
    assert "listening on http://127.0.0.1:" in log and "stopped" in log
