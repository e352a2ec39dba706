"""Idle conversations' KV cache to storage and back: one .npz file per session, written to a temp
name, fsynced, renamed into place and the directory fsynced, so a crash leaves the old file or the new
one, never half of one. A restored cache continues the sequence exactly (same bytes, same mask)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edge_sdk.errors import ConfigError
from edge_sdk.fsutil import fsync_path

from ..backends.kv_cache import KVCache, ModelIO

FORMAT = "edge-sdk-kv"
VERSION = 1


def _meta(io: ModelIO) -> dict:
    return {"format": FORMAT, "version": VERSION, "num_layers": io.num_layers, "num_kv_heads": io.num_kv_heads,
            "head_dim": io.head_dim, "kv_dtype": io.kv_dtype}


def save_kv(cache: KVCache, path: str | Path) -> int:
    """Write the cache's used part (mask and past of every layer) to `path`; returns bytes written."""
    path = Path(path)
    arrays = {"meta": np.frombuffer(json.dumps(_meta(cache.io), sort_keys=True).encode(), np.uint8),
              "mask": cache.mask}
    for layer in range(cache.io.num_layers):
        for kind in range(2):
            arrays[f"kv_{layer}_{kind}"] = np.ascontiguousarray(cache.host_past(layer, kind))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path.stat().st_size


def load_kv(path: str | Path, backend, capacity: int | None = None) -> KVCache:
    """A new cache from `backend.new_cache` holding what `save_kv` wrote, with room for `capacity` tokens."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no saved KV cache at {path}", hint="save the session first (save_kv)")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            data = {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is not a readable saved KV cache: {exc}", hint="the file is damaged; start the session again") from exc
    want = _meta(backend.io)
    if meta != want:
        diff = ", ".join(f"{k} {meta.get(k)!r} != {v!r}" for k, v in want.items() if meta.get(k) != v)
        raise ConfigError(f"{path} was saved by a different model or runtime ({diff})",
                          hint="restore it with the bundle and provider that saved it")
    mask = data["mask"]
    batch, length = mask.shape
    cache = backend.new_cache(batch, capacity or max(length + 1, 2 * length))
    cache.check_room(length)
    cache.mask = mask.astype(np.int64)
    for layer in range(backend.io.num_layers):
        for kind in range(2):
            cache.store_past(layer, kind, data[f"kv_{layer}_{kind}"])
    return cache
