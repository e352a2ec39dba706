"""`edge-sdk doctor`."""

from __future__ import annotations

from ._common import not_built


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check board, JetPack, providers, memory, storage, power (not built yet)")
    p.add_argument("rest", nargs="*", help="arguments of the command")
    p.set_defaults(func=not_built("edge-sdk doctor", "the platform layer (edge_sdk.runtime.platform) is not part of this build"))
