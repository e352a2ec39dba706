"""`edge-sdk serve --bundle BUNDLE`."""

from __future__ import annotations

from ._common import not_built


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible local API daemon (not built yet)")
    p.add_argument("rest", nargs="*", help="arguments of the command")
    p.set_defaults(func=not_built("edge-sdk serve", "the daemon (edge_sdk.runtime.server) is not part of this build"))
