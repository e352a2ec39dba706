"""Helpers shared by subcommands."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..errors import NotBuiltError


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def not_built(what: str, missing: str):
    """Handler for a command this installation cannot run yet: says so, exits non-zero."""

    def handler(args) -> int:
        raise NotBuiltError(f"'{what}' is not available in this version: {missing}")

    return handler
