"""`edge-sdk verify BUNDLE`."""

from __future__ import annotations

from ._common import not_built


def register(sub) -> None:
    p = sub.add_parser("verify", help="check a bundle's hashes and signature (not built yet)")
    p.add_argument("rest", nargs="*", help="arguments of the command")
    p.set_defaults(func=not_built("edge-sdk verify", "bundle verification is not part of this build"))
