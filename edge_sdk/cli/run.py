"""`edge-sdk run BUNDLE --prompt TEXT` and `edge-sdk bench BUNDLE`."""

from __future__ import annotations

from ._common import not_built


def register(sub) -> None:
    for name, help_ in (("run", "generate text from a bundle"), ("bench", "measure prefill/decode speed of a bundle")):
        p = sub.add_parser(name, help=f"{help_} (not built yet)")
        p.add_argument("rest", nargs="*", help="arguments of the command")
        p.set_defaults(func=not_built(f"edge-sdk {name}", "the runtime (edge_sdk.runtime generation) is not part of this build"))
