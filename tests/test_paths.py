"""edge_sdk.paths: the per-user cache directory, read from a given environment."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from edge_sdk.cli.main import resolve_device_root
from edge_sdk.paths import cache_dir


@pytest.mark.parametrize("environ,expected", [
    ({"EDGE_SDK_CACHE": "/c", "XDG_CACHE_HOME": "/x"}, Path("/c")),
    ({"XDG_CACHE_HOME": "/x"}, Path("/x/edge-sdk")),
    ({"EDGE_SDK_CACHE": "", "XDG_CACHE_HOME": ""}, Path.home() / ".cache/edge-sdk"),
    ({}, Path.home() / ".cache/edge-sdk"),
])
def test_cache_dir_precedence(environ, expected):
    assert cache_dir(environ) == expected


def test_cache_dir_reads_the_process_environment_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


@pytest.mark.parametrize("emulate,root,expected", [
    ("orin-nx-16gb", None, "/c/emulated/orin-nx-16gb"),
    ("orin-nx-16gb", "/r", "/r"),  # an explicit root wins
    (None, None, None),  # a real board: the runtime reads /
])
def test_cli_resolves_the_emulated_root_before_the_runtime_sees_it(emulate, root, expected):
    args = argparse.Namespace(emulate=emulate, root=root)
    resolve_device_root(args, {"EDGE_SDK_CACHE": "/c"})
    assert args.root == expected
