"""A loaded bundle (`edge_sdk.load`) driven step by step for the scheduler (the StepModel protocol).

Each new request is prefilled alone into its own KV cache, in the runtime's prefill chunks. Running sequences share one batched
cache; it is rebuilt (KVCache.stack, one copy of the KV) only when a sequence joins, and every decode step is one
`backend.forward(tokens[B, 1], cache)` for all of them. Rows of finished sequences stay (fed a pad token) until then:
dropping them would need a second copy of the batch. Rows are right aligned, so the batch holds
rows x (longest row + most tokens any row may still append) tokens; `kv_bytes_held` says so exactly,
for the memory manager. Speculation (one sequence running): `verify` appends [last, *drafts] to that
sequence alone in one forward, `keep` rolls its cache back to the accepted tokens.
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
        # prefill runs in chunks (the runtime's prefill_chunk): logits [chunk, V] fp32; KV copies are in kv_bytes_held
        chunk = min(self.context_length, int(getattr(model.generator, "prefill_chunk", self.context_length)))
        self.workspace_bytes = chunk * io.vocab_size * 4
        self._batch = None  # KVCache of the running rows, in self._rows order
        self._rows: list[str] = []
        self._pending: dict[str, object] = {}  # prefilled alone, not merged yet
        self._left: dict[str, int] = {}  # tokens each sequence may still append
        self._verified = 0  # tokens the last verify appended
        self._speculation(model)

    def _speculation(self, model) -> None:
        """Speculative decoding: whether the cache rolls back, and a draft's weights and one KV cache
        (one sequence speculates at a time) charged to the memory budget."""
        from ..backends.base import can_rollback

        self.can_speculate = can_rollback(self.backend)
        self.draft = getattr(model, "draft", None)
        self.has_draft = self.draft is not None
        if self.has_draft:
            db = self.draft.backend
            self.weights_bytes += graph_bytes(self.draft.bundle, self.draft.manifest, db)
            self.workspace_bytes += getattr(db, "kv_copies", 2) * db.io.kv_bytes_per_token() * self.context_length

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

    def prompt_logits(self, tokens: Sequence[int]):
        """Logits [S, V] of every prompt position, chunk by chunk, through a cache of its own that is dropped
        afterwards (echo + logprobs: the prompt's own token log-probabilities)."""
        ids = np.asarray([tokens], np.int64)
        cache = self.backend.new_cache(1, len(tokens))
        step = int(getattr(self.model.generator, "prefill_chunk", len(tokens)))
        for s in range(0, len(tokens), step):
            part = ids[:, s:s + step]
            yield self.backend.forward(part, cache, np.ones_like(part))[0]

    def step(self, seq_ids: Sequence[str], tokens: Sequence[int]) -> np.ndarray:
        if self._pending or not set(seq_ids) <= set(self._rows):
            self._rebuild(seq_ids)
        feed = dict(zip(seq_ids, tokens))
        ids = np.asarray([[feed.get(r, 0)] for r in self._rows], np.int64)  # finished rows: a pad token
        logits = self.backend.forward(ids, self._batch)[:, -1]  # [B, V]
        for r in self._rows:
            if r in self._left:
                self._left[r] -= 1
        order = {r: i for i, r in enumerate(self._rows)}
        return logits[[order[s] for s in seq_ids]]

    def verify(self, seq_id: str, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` to seq_id, the only sequence running, in one forward: logits [len(tokens), V]
        (row i: the next token after tokens[:i + 1]). `keep` then drops the rejected ones."""
        if self._pending or self._rows != [seq_id]:
            self._rebuild([seq_id])  # a batch of one: positions are tokens, no padding
        logits = self.backend.forward(np.asarray([tokens], np.int64), self._batch)[0]
        self._verified = len(tokens)
        return logits

    def keep(self, seq_id: str, n: int) -> None:
        """Keep the first n tokens of the last `verify`: the KV cache rolls back to the accepted length."""
        assert self._rows == [seq_id] and 0 < n <= self._verified, "keep() follows verify() of the same sequence"
        self._batch.rollback(self._batch.length - self._verified + n)
        self._left[seq_id] -= n
        self._verified = 0

    def draft_proposer(self, sampling, capacity: int):
        """A draft-model proposer with its own KV cache for one sequence (runtime SamplingParams)."""
        from ..generate.speculative import DraftModel

        return DraftModel(self.draft.backend, sampling, capacity, self.vocab_size)

    def _rebuild(self, seq_ids: Sequence[str]) -> None:
        from ..backends.kv_cache import KVCache

        wanted = set(seq_ids)
        parts = [(self._batch, i, r) for i, r in enumerate(self._rows) if r in wanted]
        parts += [(self._pending[r], 0, r) for r in self._pending if r in wanted]
        rows = [r for _, _, r in parts]
        assert set(rows) == wanted, "step() asked for sequences that were never prefilled"
        capacity = self._capacity([(int(c.mask[i].sum()), self._left[r]) for c, i, r in parts])
        self._batch = KVCache.stack([(c, i) for c, i, _ in parts], capacity)
        for r in rows:
            self._pending.pop(r, None)
        self._rows = rows

    @staticmethod
    def _capacity(rows: list[tuple[int, int]]) -> int:
        """Tokens per row of a batch of (cached tokens, tokens still to append) rows, right aligned."""
        return max(n for n, _ in rows) + max(left for _, left in rows)

    def kv_bytes_held(self, joining: Sequence[tuple[int, int]] = ()) -> int:
        """KV bytes held at their peak until the next step ends: the batched cache and the prompts
        prefilled alone; when sequences join (prefilled, or `joining`: (prompt tokens, max new tokens)),
        also their prefill caches, the rebuilt batch beside the old one and its staging array."""
        from ..backends.kv_cache import KVCache

        b = self.kv_bytes_per_token
        held = self._cache_bytes(self._batch) + sum(self._cache_bytes(c) for c in self._pending.values())
        if not (self._pending or joining):
            return held
        rows = [(int(n), self._left[r]) for n, r in zip(self._batch.mask.sum(axis=1), self._rows) if r in self._left] \
            if self._batch is not None else []
        rows += [(c.length, self._left[r]) for r, c in self._pending.items()]
        rows += [(int(p), int(m)) for p, m in joining]
        new, staging = KVCache.stacked_bytes(len(rows), self._capacity(rows), max(n for n, _ in rows), b, self.backend.io)
        return held + sum(p for p, _ in joining) * b + new + staging

    def _cache_bytes(self, cache) -> int:
        return 0 if cache is None else cache.batch * cache.capacity * self.kv_bytes_per_token

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
    if getattr(backend, "mapped_bytes", None) is not None:  # onnxruntime's fused graph (runtime/backends/fused/)
        return backend.mapped_bytes
    files = manifest.get("files", {})
    graph = getattr(backend, "graph_path", None)
    names = {Path(graph).name} if graph else {g["file"] for g in manifest.get("graphs", {}).values() if "file" in g}
    weights = manifest.get("weights", {}).get("file")
    if weights:
        names.add(weights)
    names |= {f"{n}.data" for n in names}  # onnx external data next to a graph
    return sum(int(files[n].get("size", 0)) for n in names if n in files)
