"""The bundle manifest a conversion writes: one assembly for every conversion path."""

from __future__ import annotations

from edge_sdk.version import __version__

from . import onnx_export

# how every path stores what is not int4
STORAGE = {"scale_dtype": "fp16", "other_dtype": "fp16", "scales_in_file": "float16; the fp32 graph casts them to float32",
           "layout": "qweight int4 [in, out], scales [in / group_size, out], DequantizeLinear axis 0"}


def bundle_manifest(ck, *, architecture: dict, quantization: dict, graphs: dict, weights: dict, io: dict, tokenizer: dict,
                    accuracy: dict) -> dict:
    """The manifest before `write_manifest` adds the file list (and signs it)."""
    return {
        "format": "edge-sdk-bundle",
        "created_by": f"edge-sdk {__version__}",
        "source": {"name": ck.name, "config": ck.config, "files": ck.files},
        "architecture": architecture,
        "quantization": quantization | STORAGE,
        "graphs": graphs,
        "weights": weights,
        "io": io,
        "tokenizer": tokenizer,
        "accuracy": accuracy,
        "opset": onnx_export.OPSET,
        "ir_version": onnx_export.IR_VERSION,
    }
