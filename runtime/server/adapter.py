"""A loaded bundle (`edge_sdk.load`) driven step by step for the scheduler (the StepModel protocol).

Each new request is prefilled alone into its own KV cache, in the runtime's prefill chunks. Running sequences share one batched
cache; it is rebuilt (KVCache.select + KVCache.merge, one copy of the KV) only when a sequence joins
or leaves, and every decode step is one `backend.forward(tokens[B, 1], cache)` for all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


class BundleStepModel:
    def __init__(self, model, *, max_batch: int = 8):
        self.model = model
        self.backend = model.backend
        self.tokenizer = model.tokenizer
        io = self.backend.io
        self.model_id = model.name
        self.context_length = int(model.generator.max_seq_len)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self.vocab_size = io.vocab_size
        # buffers per cache (two where past/present swap, one where the graph appends in place):
        # what a reserved token really costs
        self.kv_bytes_per_token = getattr(self.backend, "kv_copies", 2) * io.kv_bytes_per_token()
        self.weights_bytes = graph_bytes(model.bundle, model.manifest, self.backend)
        # prefill runs in chunks (the runtime's prefill_chunk): logits [chunk, V] fp32, plus one transient
        # copy of the batch KV when a sequence joins
        chunk = min(self.context_length, int(getattr(model.generator, "prefill_chunk", self.context_length)))
        self.workspace_bytes = chunk * io.vocab_size * 4 + max_batch * self.context_length * io.kv_bytes_per_token()
        self._batch = None  # KVCache of the running rows, in self._rows order
        self._rows: list[str] = []
        self._pending: dict[str, object] = {}  # prefilled alone, not merged yet
        self._left: dict[str, int] = {}  # tokens each sequence may still append

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.model.encode_chat(messages)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def prefill(self, seq_id: str, tokens: Sequence[int], max_new_tokens: int) -> np.ndarray:
        ids = np.asarray([tokens], np.int64)
        cache = self.backend.new_cache(1, len(tokens))
        logits = self.model.generator.prefill(ids, np.ones_like(ids), cache)  # [1, V], prompt run in chunks
        self._pending[seq_id] = cache
        self._left[seq_id] = max_new_tokens
        return logits[0]

    def step(self, seq_ids: Sequence[str], tokens: Sequence[int]) -> np.ndarray:
        if self._pending or set(seq_ids) != set(self._rows):
            self._rebuild(seq_ids)
        feed = dict(zip(seq_ids, tokens))
        ids = np.asarray([[feed[r]] for r in self._rows], np.int64)
        logits = self.backend.forward(ids, self._batch)[:, -1]  # [B, V]
        for r in self._rows:
            self._left[r] -= 1
        order = {r: i for i, r in enumerate(self._rows)}
        return logits[[order[s] for s in seq_ids]]

    def _rebuild(self, seq_ids: Sequence[str]) -> None:
        from ..kv_cache import KVCache

        wanted = set(seq_ids)
        keep = [i for i, r in enumerate(self._rows) if r in wanted]
        parts, rows = [], []
        if keep and self._batch is not None:
            parts.append(self._batch.select(keep))
            rows += [self._rows[i] for i in keep]
        for r in list(self._pending):
            if r in wanted:
                parts.append(self._pending.pop(r))
                rows.append(r)
        assert set(rows) == wanted, "step() asked for sequences that were never prefilled"
        length = max(p.length for p in parts)
        # every row may still append up to its remaining tokens; rows stay right aligned
        capacity = length + max(self._left[r] for r in rows) + 1
        self._batch = parts[0] if len(parts) == 1 and parts[0].capacity >= capacity else KVCache.merge(parts, capacity=capacity)
        self._rows = rows

    def release(self, seq_id: str) -> None:
        self._pending.pop(seq_id, None)
        self._left.pop(seq_id, None)
        if seq_id in self._rows:
            # rows already released stay in the batch until the next step's rebuild drops them; when
            # none is left alive, the batch cache goes now (several rows can finish in one step)
            if not any(r in self._left for r in self._rows):
                self._batch, self._rows = None, []


def graph_bytes(bundle: Path, manifest: dict, backend) -> int:
    """Bytes of what the backend maps: its graph file and the bundle's external weights file (or the
    fused graph's files)."""
    if getattr(backend, "plan", None) is not None:  # storage paging: what the executor holds at most
        return backend.plan.peak_bytes
    if getattr(backend, "mapped_bytes", None) is not None:  # onnxruntime's fused graph (runtime/fused_graph.py)
        return backend.mapped_bytes
    files = manifest.get("files", {})
    graph = getattr(backend, "graph_path", None)
    names = {Path(graph).name} if graph else {g["file"] for g in manifest.get("graphs", {}).values() if "file" in g}
    weights = manifest.get("weights", {}).get("file")
    if weights:
        names.add(weights)
    names |= {f"{n}.data" for n in names}  # onnx external data next to a graph
    return sum(int(files[n].get("size", 0)) for n in names if n in files)
