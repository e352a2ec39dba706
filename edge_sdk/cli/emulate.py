"""`edge-sdk emulate BOARD --root DIR`."""

from __future__ import annotations

from ._common import not_built


def register(sub) -> None:
    p = sub.add_parser("emulate", help="lay out an emulated board root (not built yet)")
    p.add_argument("rest", nargs="*", help="arguments of the command")
    p.set_defaults(func=not_built("edge-sdk emulate", "the board emulator (edge_sdk.runtime.platform) is not part of this build"))
