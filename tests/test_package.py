"""The device installs edge-sdk[runtime]: importing the SDK must not pull torch or transformers."""

import subprocess
import sys

import pytest

CHECK = """
import sys
import {module}
heavy = sorted(m for m in ("torch", "transformers", "optimum", "gptqmodel") if m in sys.modules)
print(",".join(heavy))
"""


@pytest.mark.parametrize("module", ["edge_sdk", "edge_sdk.runtime", "edge_sdk.cli.main", "edge_sdk.bundle", "edge_sdk.planner"])
def test_import_loads_no_torch_or_transformers(module):
    r = subprocess.run([sys.executable, "-c", CHECK.format(module=module)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_cli_help_loads_no_torch():
    code = "import sys; from edge_sdk.cli.main import build_parser; build_parser(); print(','.join(m for m in ('torch','transformers') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_subpackages_are_mapped_under_one_import_name():
    import edge_sdk.converters
    import edge_sdk.runtime

    assert edge_sdk.converters.__file__.replace("\\", "/").endswith("converters/__init__.py")
    assert edge_sdk.runtime.__file__.replace("\\", "/").endswith("runtime/__init__.py")


def test_wheel_builds_without_warnings_and_ships_the_data(tmp_path):
    """pyproject.toml is read by setuptools without a deprecation or a missing-package warning, and the
    wheel carries the package data (board data, real configs, calibration text) and an SPDX licence."""
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    for name in ("edge_sdk", "converters", "runtime", "jetson"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "out"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    noisy = [line for line in (r.stdout + r.stderr).splitlines() if "warning" in line.lower()]
    assert noisy == []
    (wheel,) = (tmp_path / "out").glob("edge_sdk-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {"edge_sdk/jetson/boards/tegra234.json", "edge_sdk/jetson/edge-sdk.service", "edge_sdk/data/boards.json",
            "edge_sdk/data/configs/deepseek-r1-distill-qwen-1.5b.json", "edge_sdk/data/calib/edge_domain.txt"} <= names
    assert "License-Expression: Apache-2.0" in metadata
