"""The one small interface every inference backend implements (onnxruntime, native TensorRT).

A backend owns the session; callers own KV caches and drive it step by step (see docs/runtime.md).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .kv_cache import KVCache, ModelIO


class Backend(Protocol):
    io: ModelIO
    provider: str  # what actually runs the graph, e.g. "CPUExecutionProvider" or "tensorrt"
    # KV buffers per layer and kind a cache allocates: 2 where past and present swap (the default when a
    # backend does not say), 1 where the graph appends in place (the fused graph)
    kv_copies: int

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """Preallocated KV buffers for `batch` sequences of up to `capacity` tokens."""

    def forward(self, input_ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None = None) -> np.ndarray:
        """input_ids int64 [B, S] (new_mask [B, S]: 0 = left padding) -> logits float32 [B, S, V]; appends to cache."""

    def describe(self) -> dict:
        """Provider, threads, graph file, options: shown by `bench` and logged at load."""

    # optional: True when cache.rollback(length) works on this backend's caches (speculative decoding)
    can_rollback: bool


def can_rollback(backend) -> bool:
    """Whether speculative decoding can drop rejected tokens from this backend's caches: host caches
    (onnxruntime's CPU provider, resident or paged) roll back by setting the length (the fused graph's
    shared buffer) or by swapping buffers back; device caches (CUDA, TensorRT) do not implement it."""
    flag = getattr(backend, "can_rollback", None)
    if flag is not None:
        return bool(flag)
    return getattr(backend, "provider", "") == "CPUExecutionProvider"


def check_step(input_ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate one step's inputs; return (input_ids, new_mask) as contiguous int64."""
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] != cache.batch or ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch={cache.batch}, seq>=1], got {ids.shape}")
    mask = np.ones_like(ids) if new_mask is None else np.ascontiguousarray(new_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise ValueError(f"new_mask must match input_ids {ids.shape}, got {mask.shape}")
    cache.check_room(ids.shape[1])
    return ids, mask


def one_token_at_a_time_over_a_past(run, ids: np.ndarray, cache: KVCache, mask: np.ndarray) -> np.ndarray:
    """run(ids, cache, mask) -> logits, except that a batched step of several new tokens over a past is
    fed token by token: onnxruntime's GroupQueryAttention (the fused graphs) takes such a step for one
    row at a time only. Same result; a prompt has no past, so prefill is unaffected."""
    if ids.shape[0] > 1 and ids.shape[1] > 1 and cache.length:
        return np.concatenate([run(ids[:, t:t + 1], cache, mask[:, t:t + 1]) for t in range(ids.shape[1])], axis=1)
    return run(ids, cache, mask)
