"""Conversion pipeline: GPTQ int4 quantization, ONNX export, accuracy gate, bundle writing.

``convert(model_dir, output, **options)`` is the entry point (options: see ``ConvertOptions``).
"""

from __future__ import annotations


def convert(model_dir, output, **options) -> dict:
    from .pipeline import convert as _convert

    return _convert(model_dir, output, **options)


__all__ = ["convert"]
