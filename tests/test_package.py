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
