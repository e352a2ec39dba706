"""The installed daemon unit and its OnFailure= rollback unit, checked by `systemd-analyze verify`
(skipped with the reason where systemd-analyze is missing)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_sdk.runtime.server.install import install

UNITS = Path("etc/systemd/system")


def _verify(unit: Path) -> subprocess.CompletedProcess:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed here (Debian package systemd)")
    return subprocess.run(["systemd-analyze", "verify", unit.name], cwd=unit.parent, capture_output=True, text=True, timeout=60)


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(path.read_text())
    return cp


@pytest.fixture
def units(tmp_path) -> Path:
    install(tmp_path)
    return tmp_path / UNITS


@pytest.mark.parametrize("name", ["edge-sdk.service", "edge-sdk-rollback.service"])
def test_installed_unit_verifies_without_a_warning_on_its_lines(units, name):
    done = _verify(units / name)
    assert done.returncode == 0, done.stderr
    assert not [ln for ln in done.stderr.splitlines() if "edge-sdk" in ln], done.stderr


def test_on_failure_names_the_installed_rollback_unit_and_verify_loads_it(units):
    daemon, rollback = _unit(units / "edge-sdk.service"), _unit(units / "edge-sdk-rollback.service")
    target = daemon["Unit"]["OnFailure"]
    assert (units / target).is_file() and target == "edge-sdk-rollback.service"
    assert "device boot-check" in daemon["Service"]["ExecStartPre"] and "--max-boots 3" in daemon["Service"]["ExecStartPre"]
    assert rollback["Service"]["Type"] == "oneshot" and rollback["Service"]["ExecStart"].endswith("--give-up")
    # verifying the daemon loads its OnFailure= unit: a broken rollback unit shows up there
    (units / target).write_text((units / target).read_text().replace("Type=oneshot", "Type=oneshott"))
    done = _verify(units / "edge-sdk.service")
    assert "edge-sdk-rollback.service" in done.stderr and "oneshott" in done.stderr
