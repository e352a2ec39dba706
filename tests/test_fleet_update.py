"""`device update`: sources, resumable download, A/B switch, kill -9 at every step, bad input, health and rollback."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("cryptography")

from edge_sdk.bundle import read_manifest, verify_bundle, write_manifest  # noqa: E402
from edge_sdk.errors import BundleError, EdgeSDKError  # noqa: E402
from edge_sdk.runtime.fleet.health import HealthCheck, HealthCheckError  # noqa: E402
from edge_sdk.runtime.fleet.slots import MAX_BOOTS, SlotStore  # noqa: E402
from edge_sdk.runtime.fleet.update import Device, rollback, status, update  # noqa: E402
from fleet_helpers import BundleServer, corrupt, keypair, signed_bundle, tree_digest  # noqa: E402
from free_port import free_port  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    t = tmp_path_factory.mktemp("fleet")
    priv, pub = keypair(t / "keys")
    other_priv, _ = keypair(t / "other-keys")
    b = {"v1": signed_bundle(t / "pub" / "v1", priv, "1"), "v2": signed_bundle(t / "pub" / "v2", priv, "2"),
         "nano": signed_bundle(t / "pub" / "nano", priv, "3", boards=["orin-nano-8gb"]),
         "stranger": signed_bundle(t / "pub" / "stranger", other_priv, "4")}
    for name in ("v2",):
        with tarfile.open(t / "pub" / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(b[name], arcname=name)
    return {"dir": t, "priv": priv, "pub": pub, "bundles": b}


def make_device(tmp_path, world, **kw) -> Device:
    d = Device(SlotStore(tmp_path / "state" / "slots"), world["pub"], restart=kw.pop("restart", lambda: None), **kw)
    update(str(world["bundles"]["v1"]), d)
    return d


def serving(d: Device, key) -> str:
    """The version `current` serves, after checking it verifies with the trusted key."""
    v = verify_bundle(d.slots.link, key, require_signature=True)
    v.close()
    return v["version"]


@pytest.mark.parametrize("kind", ["directory", "tarball", "url", "tarball-url"])
def test_update_from_each_source_switches_slots(tmp_path, world, kind):
    d = make_device(tmp_path, world, board="agx-orin-64gb")
    pub = world["dir"] / "pub"
    with BundleServer(pub) as s:
        source = {"directory": str(pub / "v2"), "tarball": str(pub / "v2.tar.gz"),
                  "url": f"{s.url}/v2", "tarball-url": f"{s.url}/v2.tar.gz"}[kind]
        out = update(source, d)
    assert out["result"] == "updated" and (out["slot"], out["previous"]) == ("b", "a")
    assert serving(d, world["pub"]) == "2" and d.slots.active() == "b"
    assert tree_digest(d.slots.path("b")) == tree_digest(world["bundles"]["v2"])
    assert not (d.slots.root / ".incoming").exists()
    st = status(d.slots, world["pub"])
    assert st["slots"]["a"]["version"] == "1" and st["slots"]["b"]["health"] == "good" and st["slots"]["a"]["verified"] == "ok"
    assert st["slots"]["b"]["signer"].startswith("ed25519:")


def test_cut_transfer_resumes_with_range(tmp_path, world):
    d = make_device(tmp_path, world)
    with BundleServer(world["dir"] / "pub") as s:
        s.httpd.cut["/v2/tokenizer.json"] = 5000
        update(f"{s.url}/v2", d)
        asked = [r for p, r in s.httpd.requests if p == "/v2/tokenizer.json"]
    assert asked == [None, "bytes=5000-"]
    assert serving(d, world["pub"]) == "2"


def test_same_bundle_again_changes_nothing(tmp_path, world):
    d = make_device(tmp_path, world)
    assert update(str(world["bundles"]["v1"]), d)["result"] == "unchanged"
    assert d.slots.active() == "a" and not d.slots.path("b").exists()


# --- kill -9 at every step ------------------------------------------------------------------------

KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from edge_sdk.runtime.fleet.slots import SlotStore
from edge_sdk.runtime.fleet.update import Device, update
step, n = sys.argv[1], int(sys.argv[2])
seen = []
def hook(s):
    seen.append(s)
    if s == step and seen.count(s) == n:
        os.kill(os.getpid(), signal.SIGKILL)
update(sys.argv[3], Device(SlotStore(Path(sys.argv[4])), Path(sys.argv[5]), restart=lambda: None, hook=hook))
"""


@pytest.mark.parametrize("step,n", [("download-chunk", 2), ("verify", 1), ("install", 1), ("switch", 1),
                                    ("switching", 1), ("switched", 1), ("restarted", 1)])
def test_kill_at_each_step_leaves_a_verified_bundle_serving(tmp_path, world, step, n):
    d = make_device(tmp_path, world)
    with BundleServer(world["dir"] / "pub") as s:
        source = f"{s.url}/v2"
        done = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(tests=str(TESTS)), step, str(n), source,
                               str(d.slots.root), str(world["pub"])], capture_output=True, text=True, timeout=120)
        assert done.returncode == -signal.SIGKILL, done.stderr
        before_switch = step in ("download-chunk", "verify", "install", "switch", "switching")
        assert serving(d, world["pub"]) == ("1" if before_switch else "2")
        s.httpd.requests.clear()
        update(source, d)  # the next update (or boot) settles the interrupted one and finishes
        if step == "download-chunk":
            assert any(r and r.startswith("bytes=") for _, r in s.httpd.requests), s.httpd.requests
    assert serving(d, world["pub"]) == "2" and d.slots.state()["trial"] is None


def test_boot_counter_gives_up_a_slot_that_never_becomes_healthy(tmp_path, world):
    d = make_device(tmp_path, world)
    d.hook = lambda s: (_ for _ in ()).throw(KeyboardInterrupt()) if s == "restarted" else None
    with pytest.raises(KeyboardInterrupt):  # the updater dies after the switch; systemd restarts the daemon
        update(str(world["bundles"]["v2"]), d)
    msgs = [d.slots.boot_check() for _ in range(MAX_BOOTS + 1)]
    assert "start 1 of" in msgs[0] and "rolled back to slot a" in msgs[-1]
    assert serving(d, world["pub"]) == "1" and d.slots.state()["slots"]["b"]["health"] == "bad"


def test_crash_between_trial_record_and_switch_is_settled_at_boot(tmp_path, world):
    d = make_device(tmp_path, world)
    d.slots.install(shutil.copytree(world["bundles"]["v2"], tmp_path / "staged"), "b", {"version": "2"})
    d.slots.begin_trial("b")
    assert "never happened" in d.slots.boot_check() and d.slots.state()["trial"] is None
    assert serving(d, world["pub"]) == "1"


# --- bad input: one line, active bundle untouched ----------------------------------------------------


def _outside_bundle(world, tmp_path) -> Path:
    d = shutil.copytree(world["bundles"]["v2"], tmp_path / "evil")
    m = read_manifest(d)
    m["files"] = {**m["files"], "../escape.txt": {"sha256": "0" * 64, "size": 1}}
    data = (json.dumps(m, indent=2, sort_keys=True) + "\n").encode()
    from edge_sdk.bundle import sign
    (d / "manifest.json").write_bytes(data)
    (d / "manifest.sig").write_bytes(sign(data, world["priv"]))
    return d


def _corrupt_copy(world, tmp_path) -> Path:
    d = shutil.copytree(world["bundles"]["v2"], tmp_path / "bad")
    corrupt(d / "model.onnx")
    return d


def _truncated_tarball(world, tmp_path) -> Path:
    data = (world["dir"] / "pub" / "v2.tar.gz").read_bytes()
    p = tmp_path / "cut.tar.gz"
    p.write_bytes(data[: len(data) // 2])
    return p


BAD = {
    "untrusted key": (lambda w, t: w["bundles"]["stranger"], "signature does not match the trusted key"),
    "corrupted file": (_corrupt_copy, "fails its sha256 check"),
    "truncated tarball": (_truncated_tarball, "tarball"),
    "another board": (lambda w, t: w["bundles"]["nano"], "made for orin-nano-8gb, not this board (agx-orin-64gb)"),
    "file outside the bundle": (_outside_bundle, "outside the bundle"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_update_is_one_line_and_leaves_the_active_bundle(tmp_path, world, case):
    events = []
    d = make_device(tmp_path, world, board="agx-orin-64gb", report=lambda kind, **f: events.append((kind, f)))
    make, words = BAD[case]
    before = tree_digest(d.slots.link)
    with pytest.raises(EdgeSDKError) as e:
        update(str(make(world, tmp_path)), d)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert d.slots.active() == "a" and tree_digest(d.slots.link) == before and serving(d, world["pub"]) == "1"
    assert events and events[-1][0] == "update_refused" and words in events[-1][1]["reason"]


def test_corrupted_slot_on_disk_is_named_and_not_rolled_back_to(tmp_path, world):
    d = make_device(tmp_path, world)
    update(str(world["bundles"]["v2"]), d)
    corrupt(d.slots.path("a") / "model.onnx")
    assert status(d.slots, world["pub"])["slots"]["a"]["verified"].startswith("corrupt: ")
    with pytest.raises(BundleError, match="slot a is corrupt on disk") as e:
        rollback(d)
    assert "\n" not in str(e.value) and d.slots.active() == "b" and serving(d, world["pub"]) == "2"


def test_rollback_switches_to_the_other_slot(tmp_path, world):
    d = make_device(tmp_path, world)
    update(str(world["bundles"]["v2"]), d)
    assert rollback(d)["slot"] == "a" and serving(d, world["pub"]) == "1"


# --- a real daemon: health check through a generation, switch back on failure ---------------------


class ServedDevice:
    """`edge-sdk serve` on the slot link; restart() is what `systemctl restart edge-sdk` does."""

    def __init__(self, tmp: Path, slots: SlotStore, key: Path):
        self.port = free_port()  # kept across restarts, as systemd's unit keeps it
        self.config = tmp / "edge-sdk.toml"
        self.config.write_text(f'bundle = "{slots.link}"\nbundle_key = "{key}"\nemulate = "agx-orin-64gb"\n'
                               f'[server]\nport = {self.port}\n[memory]\nreserve_mb = 0\n')
        self.proc = None
        self.log = tmp / "serve.log"

    def restart(self) -> None:
        self.stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli.main", "serve", "--config", str(self.config)],
                                     stdout=open(self.log, "a"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _broken_bundle(world, tmp_path) -> Path:
    """Signed and hash-correct, but its graph does not load: only the daemon can tell."""
    d = shutil.copytree(world["bundles"]["v2"], tmp_path / "broken")
    (d / "model.onnx").write_bytes(b"not an onnx graph")
    m = {k: v for k, v in read_manifest(d).items() if k not in ("files", "schema_version")}
    write_manifest(d, {**m, "version": "broken"}, world["priv"])
    return d


def test_daemon_health_check_commits_or_switches_back(tmp_path, world):
    slots = SlotStore(tmp_path / "state" / "slots")
    served = ServedDevice(tmp_path, slots, world["pub"])
    health = HealthCheck(f"http://127.0.0.1:{served.port}", timeout_s=90)
    d = Device(slots, world["pub"], restart=served.restart, health=health)
    try:
        assert update(str(world["bundles"]["v1"]), d)["generated"] is not None
        with pytest.raises(HealthCheckError, match="switched back to slot a") as e:
            update(str(_broken_bundle(world, tmp_path)), d)
        assert "\n" not in str(e.value)
        assert slots.active() == "a" and slots.state()["slots"]["b"]["health"] == "bad"
        from edge_sdk.runtime.fleet.health import run_check
        assert run_check(health)["generated"] is not None  # the previous bundle serves again
        out = update(str(world["bundles"]["v2"]), d)
        assert out["slot"] == "b" and serving(d, world["pub"]) == "2"
    finally:
        served.stop()
