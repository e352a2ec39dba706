"""A built fused graph as the onnxruntime backend loads it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .graph import METADATA, WEIGHTS_NAME
from .weights import EmbeddingRows


@dataclass
class FusedGraph:
    """A built fused graph as a backend uses it: the graph file (its sidecar beside it), the positions
    its rotary tables cover, and the embedding rows it is fed."""

    path: Path
    positions: int
    embedding: EmbeddingRows

    @property
    def sidecar_dir(self) -> Path:
        return self.path.parent

    def metadata(self) -> dict:
        """The sidecar's fused.json: where every tensor is, the file's size, what it was built from."""
        return json.loads((self.sidecar_dir / METADATA).read_text())

    def loaded_bytes(self) -> int:
        """What loading it takes in: the graph and the sidecar weights (embedding rows are read per step)."""
        return self.path.stat().st_size + (self.sidecar_dir / WEIGHTS_NAME).stat().st_size

    def read_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: the sidecar's tensors (rotary tables excepted) and one
        embedding row."""
        return sum(t["nbytes"] for n, t in self.metadata()["tensors"].items() if not n.startswith("rope.")) + self.embedding.row
