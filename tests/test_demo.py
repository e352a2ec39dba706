"""examples/demo.py keeps its bundle in a stated place and says what to try next (the steps themselves
are faked here; tests/test_server_demo.py runs the real thing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.fixture
def demo(monkeypatch):
    spec = importlib.util.spec_from_file_location("edge_sdk_demo", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Daemon:
        def send_signal(self, sig):
            pass

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    def convert(work, arch, method):
        (work / "bundle").mkdir(parents=True, exist_ok=True)
        (work / "bundle" / "manifest.json").write_text("{}")
        return work / "bundle"

    monkeypatch.setattr(mod, "convert", convert)
    monkeypatch.setattr(mod, "serve", lambda bundle, board, log: (Daemon(), "http://127.0.0.1:1"))
    monkeypatch.setattr(mod, "ask", lambda url: None)
    return mod


def test_the_bundle_stays_in_the_cache_and_the_next_commands_name_it(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path / "cache"))
    assert demo.main([]) == 0
    bundle = tmp_path / "cache" / "demo" / "bundle"
    assert (bundle / "manifest.json").exists()
    out = capsys.readouterr().out
    assert "random weights" in out
    for verb in ("edge-sdk run", "edge-sdk bench", "edge-sdk serve --bundle"):
        assert any(line.startswith(verb) and str(bundle) in line and "--emulate agx-orin-64gb" in line
                   for line in out.splitlines()), verb


def test_default_place_without_edge_sdk_cache(demo, tmp_path, monkeypatch):
    monkeypatch.delenv("EDGE_SDK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_dir() == tmp_path / "xdg" / "edge-sdk" / "demo"


def test_a_given_directory_is_kept_and_remove_deletes_it(demo, tmp_path):
    assert demo.main(["--dir", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "bundle" / "manifest.json").exists()
    assert demo.main(["--keep", str(tmp_path / "k"), "--remove"]) == 0
    assert not (tmp_path / "k").exists()
