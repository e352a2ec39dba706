"""edge-sdk: DeepSeek language models on NVIDIA Jetson devices.

Public API (heavy parts are imported only when called):

- ``edge_sdk.plan(model, board=...)``: memory and speed of a model on a board.
- ``edge_sdk.convert(model_dir, output, ...)``: GPTQ int4 -> ONNX -> release bundle.
- ``edge_sdk.load(bundle, ...)``: a model that generates text on this machine or device.
"""

from __future__ import annotations

from .version import __version__  # noqa: E402

from .boards import Board, PowerMode, board_names, get_board  # noqa: E402
from .errors import EdgeSDKError  # noqa: E402
from .planner import Plan, QuantSpec, plan  # noqa: E402


def convert(model_dir, output, **options):
    """Convert a Hugging Face DeepSeek checkpoint into a release bundle (needs ``edge-sdk[convert]``)."""
    from .errors import require

    require("torch", "convert")
    from .converters import convert as _convert

    return _convert(model_dir, output, **options)


def load(bundle, *, key=None, draft=None, **options):
    """Load a verified bundle for generation (needs ``edge-sdk[runtime]``).

    ``key``: trusted ed25519 public key file; the bundle's manifest.sig must verify against it (the same
    setting as ``--key`` of verify, run, bench and serve).
    ``draft``: a smaller bundle with the same tokenizer, loaded with the same options, that
    `generate` speculates with (docs/runtime.md, Speculative decoding)."""
    from .errors import ConfigError, require

    if key is not None:
        if options.get("public_key") not in (None, key):
            raise ConfigError("load() got both key and public_key", hint="pass the trusted key once, as key=")
        options["public_key"] = str(key)
    require("onnxruntime", "runtime")
    from .runtime import load as _load

    model = _load(bundle, **options)
    if draft is not None:
        model.attach_draft(_load(draft, **{k: v for k, v in options.items() if k not in ("max_batch", "kv_budget_bytes")}))
    return model


__all__ = ["Board", "PowerMode", "EdgeSDKError", "Plan", "QuantSpec", "board_names", "convert", "get_board", "load", "plan", "__version__"]
