"""Device runtime: backends, generation, memory, paging, platform layer, power, telemetry, daemon. Never imports torch or transformers.

``load(bundle, **options)`` verifies a bundle and returns a ``Model``; see docs/runtime.md for the
backend interface (``Backend.forward`` over ``KVCache``) that the daemon drives step by step.
"""

from __future__ import annotations

from pathlib import Path


def load(bundle, **options):
    """Verify `bundle`, pick a backend, and return a Model (options: see RuntimeOptions)."""
    from .loader import make_backend, open_bundle
    from .generate.model import Model
    from .options import RuntimeOptions
    from .generate.tokenizer import Tokenizer

    opts = RuntimeOptions.from_kwargs(**options)
    root = Path(bundle)
    manifest = open_bundle(root, opts)
    tokenizer = Tokenizer(root, manifest.get("tokenizer"))
    backend = make_backend(root, manifest, opts)
    manifest.check_unchanged()  # what the backend and tokenizer opened by name is what was verified
    return Model(root, manifest, backend, tokenizer, opts)


__all__ = ["load"]
