"""Where edge-sdk keeps its per-user files. The environment is read here, by the entry points (the CLI,
the Python API), and the directory is passed down: nothing below them reads the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """EDGE_SDK_CACHE, else $XDG_CACHE_HOME/edge-sdk, else ~/.cache/edge-sdk."""
    env = os.environ if environ is None else environ
    if env.get("EDGE_SDK_CACHE"):
        return Path(env["EDGE_SDK_CACHE"])
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-sdk"
