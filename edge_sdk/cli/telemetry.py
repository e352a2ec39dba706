"""`edge-sdk telemetry listen|uplink PORT_URL`."""

from __future__ import annotations

from ._common import not_built


def register(sub) -> None:
    p = sub.add_parser("telemetry", help="serial telemetry uplink and ground receiver (not built yet)")
    p.add_argument("rest", nargs="*", help="arguments of the command")
    p.set_defaults(func=not_built("edge-sdk telemetry", "the telemetry uplink (edge_sdk.runtime.telemetry) is not part of this build"))
