"""`edge-sdk engine build BUNDLE`."""

from __future__ import annotations

from ._common import not_built


def register(sub) -> None:
    p = sub.add_parser("engine", help="build a TensorRT engine for this board (not built yet)")
    p.add_argument("rest", nargs="*", help="arguments of the command")
    p.set_defaults(func=not_built("edge-sdk engine", "the TensorRT engine builder is not part of this build"))
