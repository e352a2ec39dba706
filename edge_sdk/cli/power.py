"""`edge-sdk power status|set MODE|policy NAME`."""

from __future__ import annotations

from ._common import not_built


def register(sub) -> None:
    p = sub.add_parser("power", help="read and switch nvpmodel power modes (not built yet)")
    p.add_argument("rest", nargs="*", help="arguments of the command")
    p.set_defaults(func=not_built("edge-sdk power", "the platform layer (edge_sdk.runtime.platform) is not part of this build"))
