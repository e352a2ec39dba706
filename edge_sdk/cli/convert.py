"""`edge-sdk convert MODEL_DIR -o BUNDLE`."""

from __future__ import annotations

from ._common import not_built


def register(sub) -> None:
    p = sub.add_parser("convert", help="quantize a checkpoint to GPTQ int4, export ONNX, write a release bundle (not built yet)")
    p.add_argument("rest", nargs="*", help="arguments of the command")
    p.set_defaults(func=not_built("edge-sdk convert", "the conversion pipeline (edge_sdk.converters) is not part of this build"))
