"""The fused onnxruntime graph (contrib ops over repacked int4 weights), cached beside the bundle:
`graph.py` builds the graph, `weights.py` writes its sidecar weights file and reads embedding rows,
`cache.py` keeps built entries (sha256-checked), `session.py` is what the onnxruntime backend loads."""

from .cache import ensure, key, prune
from .graph import (DEFAULT_POSITIONS, METADATA, WEIGHTS_NAME, Shape, build_graph, build_layer_graph, build_tail_graph,
                    supported)
from .session import FusedGraph
from .weights import EmbeddingRows, rope_from_graph, rope_rows, to_matmulnbits, unpack_int4

__all__ = ["DEFAULT_POSITIONS", "METADATA", "WEIGHTS_NAME", "EmbeddingRows", "FusedGraph", "Shape", "build_graph",
           "build_layer_graph", "build_tail_graph", "ensure", "key", "prune", "rope_from_graph", "rope_rows", "supported",
           "to_matmulnbits", "unpack_int4"]
