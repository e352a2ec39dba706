"""One external weights file shared by every graph of a bundle, each tensor at a page-aligned offset.

Tensors are laid out embeddings first, then decoder layers in order (so layer i is one contiguous
byte range the paging executor can read), then the final norm and lm_head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ALIGNMENT = 4096
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class StoredTensor:
    name: str
    data: bytes
    dtype: str  # "int4" | "float16" | "float32"
    shape: tuple[int, ...]


def _order(name: str) -> tuple:
    m = _LAYER.match(name)
    if m:
        return (1, int(m.group(1)))
    return (0,) if name.startswith("model.embed_tokens") else (2,)


def write_weights(path: Path, tensors: list[StoredTensor], alignment: int = ALIGNMENT) -> dict:
    """Write tensors (stable order within a layer as given) and return the manifest's `weights` section."""
    ordered = sorted(tensors, key=lambda t: _order(t.name))  # sort is stable: keeps the given order inside a layer
    table: dict[str, dict] = {}
    layers: dict[int, list[int]] = {}
    offset = 0
    with open(path, "wb") as f:
        for t in ordered:
            offset = -(-offset // alignment) * alignment
            f.seek(offset)
            f.write(t.data)
            table[t.name] = {"offset": offset, "nbytes": len(t.data), "dtype": t.dtype, "shape": list(t.shape)}
            m = _LAYER.match(t.name)
            if m:
                span = layers.setdefault(int(m.group(1)), [offset, offset])
                span[1] = offset + len(t.data)
            offset += len(t.data)
        f.truncate(offset)
    return {
        "file": path.name,
        "alignment": alignment,
        "tensors": table,
        "layers": [{"index": i, "offset": a, "nbytes": b - a} for i, (a, b) in sorted(layers.items())],
    }
