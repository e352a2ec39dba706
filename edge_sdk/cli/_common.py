"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from ..errors import NotBuiltError


def state_dir(explicit):
    """The telemetry queue's directory: --state-dir, else the environment's (runtime.telemetry.uplink.state_dir)."""
    import os

    from edge_sdk.runtime.telemetry.uplink import state_dir as resolve

    return resolve(explicit, os.environ, hasattr(os, "geteuid") and os.geteuid() == 0)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def bundle_path(text: str) -> str:
    """argparse type: a non-empty path (an empty --draft would silently mean no draft)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; pass the bundle directory")
    return text


def int_at_least(low: int):
    """argparse type: an integer >= low, checked before any work starts (argparse names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def number_in(low: float, high: float = math.inf, *, low_open: bool = False, why: str = ""):
    """argparse type: a float in [low, high] ((low, high] with low_open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > low if low_open else value >= low) or not value <= high:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be {'in ' if high < math.inf else ''}{span}, got {text}{why}")
        return value

    return parse


def not_built(what: str, missing: str):
    """Handler for a command this installation cannot run yet: says so, exits non-zero."""

    def handler(args) -> int:
        raise NotBuiltError(f"'{what}' is not available in this version: {missing}")

    return handler
