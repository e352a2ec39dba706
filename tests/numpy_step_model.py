"""A served model whose KV cache is the runtime's real numpy KVCache: the daemon's adapter
(BundleStepModel) over a backend that writes the cache as onnxruntime does (past copied into the
other buffer, new keys appended) and predicts a fixed token. For memory accounting tests and the
KV accounting benchmark: every byte of KV the daemon holds is a real numpy allocation."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edge_sdk.runtime.backends.kv_cache import KVCache, ModelIO
from edge_sdk.runtime.server.adapter import BundleStepModel

VOCAB = 64
EOS = VOCAB - 1


class NumpyKVBackend:
    kv_copies = 2  # past and present swap between two buffers

    def __init__(self, io: ModelIO):
        self.io = io
        self.fail_next = False

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.io, batch, capacity)

    def forward(self, ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None = None) -> np.ndarray:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        b, s = ids.shape
        cache.check_room(s)
        n = cache.length
        for layer in range(self.io.num_layers):
            for kind in range(2):
                present = cache.present_target(layer, kind, s)  # [B, H, n + s, D]
                present[:, :, :n] = cache.past(layer, kind)
                present[:, :, n:] = ids[:, None, :, None]
        cache.advance(np.ones((b, s), np.int64) if new_mask is None else new_mask)
        logits = np.zeros((b, s, VOCAB), np.float32)
        logits[..., 1 + cache.length % (VOCAB - 2)] = 1.0  # never EOS: every request runs to max_tokens
        return logits


class _Generator:
    def __init__(self, backend, max_seq_len: int, prefill_chunk: int = 256):
        self.backend, self.max_seq_len, self.prefill_chunk = backend, max_seq_len, prefill_chunk

    def prefill(self, ids, mask, cache):
        for start in range(0, ids.shape[1], self.prefill_chunk):
            logits = self.backend.forward(ids[:, start:start + self.prefill_chunk], cache, mask[:, start:start + self.prefill_chunk])
        return logits[:, -1, :]


def numpy_step_model(*, layers: int, kv_heads: int, head_dim: int, context: int, max_batch: int) -> BundleStepModel:
    io = ModelIO(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=VOCAB, max_positions=context)
    backend = NumpyKVBackend(io)
    tokenizer = SimpleNamespace(eos_token_ids=[EOS], encode=lambda t: [1 + b % (VOCAB - 2) for b in t.encode()],
                                decode=lambda ids: "".join(chr(97 + i % 26) for i in ids))
    model = SimpleNamespace(backend=backend, tokenizer=tokenizer, name="numpy-kv", bundle=Path("."), manifest={},
                            generator=_Generator(backend, context))
    return BundleStepModel(model, max_batch=max_batch)
