"""`edge-sdk device install --root DIR` against a fake root: what lands where, and idempotence."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from edge_sdk.cli.main import main
from edge_sdk.errors import ConfigError
from edge_sdk.runtime.server.install import install

JETSON = Path(__file__).resolve().parents[1] / "jetson"


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    # an L4T-like starting point: system groups exist, uids 999/998 taken
    (r / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nsystemd-network:x:999:999::/:/usr/sbin/nologin\n"
                                      "nvidia:x:1000:1000::/home/nvidia:/bin/bash\n")
    (r / "etc" / "group").write_text("root:x:0:\ndialout:x:20:nvidia\nvideo:x:44:\nrender:x:109:\nsystemd-network:x:999:\n")
    return r


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes(), oct(p.stat().st_mode)) for p in sorted(root.rglob("*")) if p.is_file()}


def test_install_lays_out_user_dirs_config_unit_and_rule(root, capsys):
    assert main(["device", "install", "--root", str(root), "--bundle", "/opt/models/r1-1.5b", "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)
    assert {s["what"]: s["result"] for s in steps} == {
        "sysusers entry": "created", "service user": "updated", "state directory": "created", "directory": "created", "config": "created",
        "systemd unit": "created", "rollback unit": "created", "udev rule": "created"}
    user = next(l.split(":") for l in (root / "etc/passwd").read_text().splitlines() if l.startswith("edge-sdk:"))
    assert user[2] == "998" and user[5] == "/var/lib/edge-sdk" and user[6] == "/usr/sbin/nologin"  # 999 was taken
    groups = {l.split(":")[0]: l.split(":") for l in (root / "etc/group").read_text().splitlines()}
    assert groups["edge-sdk"][2] == user[3] == "998"
    assert groups["dialout"][3] == "nvidia,edge-sdk" and groups["video"][3] == "edge-sdk"
    assert (root / "var/lib/edge-sdk").is_dir() and oct((root / "var/lib/edge-sdk").stat().st_mode)[-3:] == "750"
    cfg = tomllib.loads((root / "etc/edge-sdk/edge-sdk.toml").read_text())
    assert cfg["bundle"] == "/opt/models/r1-1.5b" and cfg["server"]["host"] == "127.0.0.1"
    unit = (root / "etc/systemd/system/edge-sdk.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "Restart=on-failure" in unit
    assert "serve --config /etc/edge-sdk/edge-sdk.toml" in unit and "/usr/local/bin/edge-sdk" not in unit
    exe = unit.split("ExecStart=")[1].split(" serve")[0].split()[0]
    assert os.access(exe, os.X_OK)  # the unit starts this installation's CLI
    assert (root / "etc/udev/rules.d/99-edge-sdk-serial.rules").read_text() == (JETSON / "99-edge-sdk-serial.rules").read_text()


def test_second_install_changes_nothing_and_keeps_operator_edits(root):
    install(root, bundle="/b")
    cfg = root / "etc/edge-sdk/edge-sdk.toml"
    cfg.write_text(cfg.read_text().replace('port = 8080', 'port = 9090'))
    before = tree(root)
    steps = install(root, bundle="/other")
    assert {s.result for s in steps} == {"unchanged"}
    assert tree(root) == before


def test_install_repairs_a_changed_unit(root):
    install(root)
    unit = root / "etc/systemd/system/edge-sdk.service"
    good = unit.read_text()
    unit.write_text("[Service]\nExecStart=/bin/false\n")
    steps = {s.what: s.result for s in install(root)}
    assert steps["systemd unit"] == "updated" and unit.read_text() == good


def test_install_into_an_empty_root_creates_the_account_files(tmp_path):
    install(tmp_path)
    assert (tmp_path / "etc/passwd").read_text().startswith("edge-sdk:x:999:999:")


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        install(tmp_path / "nope")


def test_installed_unit_passes_systemd_analyze(root):
    import shutil
    import subprocess

    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed here")
    install(root)
    done = subprocess.run(["systemd-analyze", "verify", str(root / "etc/systemd/system/edge-sdk.service")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
