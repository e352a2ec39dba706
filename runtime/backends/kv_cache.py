"""KV cache in preallocated buffers: two fixed buffers per layer and kind that swap roles each step.

The graph concatenates past and new keys into `present`; binding `present` to the second buffer
means it lands straight where the next step's `past` is read from. No buffer grows or is
allocated per token. Rows share one length (`length`, left padding included); `mask` says which
positions of each row are real.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_sdk.errors import ConfigError, MemoryBudgetError


@dataclass(frozen=True)
class ModelIO:
    """What a backend needs to know about the graph (from the manifest's `io` and `architecture`)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    kv_dtype: str = "float32"  # numpy name
    past_name: str = "past_key_values.{i}.{kind}"
    present_name: str = "present.{i}.{kind}"

    @classmethod
    def from_manifest(cls, manifest: dict, kv_dtype: str = "float32") -> "ModelIO":
        kv = manifest["io"]["kv"]
        arch = manifest["architecture"]
        if kv.get("layout", "BHSD") != "BHSD":
            raise ConfigError(f"KV layout {kv.get('layout')!r} is not supported", hint="this runtime reads BHSD bundles")
        return cls(int(kv["num_layers"]), int(kv["num_kv_heads"]), int(kv["head_dim"]), int(arch["vocab_size"]),
                   int(arch.get("max_position_embeddings") or 1 << 30), kv_dtype,
                   kv.get("past", cls.past_name), kv.get("present", cls.present_name))

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize


@dataclass
class KVCache:
    io: ModelIO
    batch: int
    capacity: int
    # buffers[layer][kind] = (flat buffer A, flat buffer B); kind 0 = key, 1 = value
    buffers: list = field(repr=False, default=None)
    mask: np.ndarray = field(repr=False, default=None)  # int64 [B, length]
    current: int = 0  # which of the two buffers holds `past`
    device = "cpu"  # where the buffers live (class attribute; device caches override)

    def __post_init__(self):
        if self.batch < 1 or self.capacity < 1:
            raise ConfigError(f"a KV cache needs batch >= 1 and capacity >= 1, got {self.batch}, {self.capacity}")
        if self.buffers is None:
            n = self.batch * self.io.num_kv_heads * self.capacity * self.io.head_dim
            dt = np.dtype(self.io.kv_dtype)
            self.buffers = [[(np.zeros(n, dt), np.zeros(n, dt)) for _ in range(2)] for _ in range(self.io.num_layers)]
        if self.mask is None:
            self.mask = np.zeros((self.batch, 0), np.int64)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for layer in self.buffers for pair in layer for b in pair)

    def _view(self, flat: np.ndarray, length: int) -> np.ndarray:
        h, d = self.io.num_kv_heads, self.io.head_dim
        return flat[: self.batch * h * length * d].reshape(self.batch, h, length, d)

    def past(self, layer: int, kind: int) -> np.ndarray:
        """[B, H, length, D] view of the buffer holding the cache now."""
        return self._view(self.buffers[layer][kind][self.current], self.length)

    def present_target(self, layer: int, kind: int, new: int) -> np.ndarray:
        """[B, H, length + new, D] view the graph writes the updated cache into."""
        return self._view(self.buffers[layer][kind][1 - self.current], self.length + new)

    def check_room(self, new: int) -> None:
        if self.length + new > self.capacity:
            raise MemoryBudgetError(f"the KV cache holds {self.capacity} tokens; {self.length} used, {new} more asked",
                                    hint="raise max_seq_len when loading, or shorten the prompt / max_new_tokens")

    def advance(self, new_mask: np.ndarray) -> None:
        """After a step wrote `present`: swap buffers and extend the mask by new_mask [B, S]."""
        self._step_start = self.length  # the other buffer still holds the cache of this length
        self.current = 1 - self.current
        self.mask = np.concatenate([self.mask, new_mask.astype(np.int64)], axis=1)

    def rollback(self, length: int) -> None:
        """Keep the first `length` positions (speculative decoding drops rejected tokens).

        Back to the start of the last step: swap the buffers back (the other one still holds that
        cache), no copy. Within the last step: the rows' layout [B, H, length, D] depends on the length,
        so the kept tokens are copied into the other buffer (what the graph's Concat does every step)."""
        if not 0 <= length <= self.length:
            raise ConfigError(f"cannot roll a KV cache of {self.length} tokens back to {length}")
        if length == self.length:
            return
        if length == getattr(self, "_step_start", -1):
            self.current = 1 - self.current
        else:
            for layer in range(self.io.num_layers):
                for kind in range(2):
                    self._view(self.buffers[layer][kind][1 - self.current], length)[...] = self.past(layer, kind)[:, :, :length]
            self.current = 1 - self.current
        self._step_start = -1
        self.mask = self.mask[:, :length]

    def step_inputs(self, new_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """attention_mask [B, length + S] and position_ids [B, S] for the next S tokens."""
        attn = np.concatenate([self.mask, new_mask.astype(np.int64)], axis=1)
        pos = np.cumsum(attn, axis=1) - 1
        return attn, np.maximum(pos[:, self.length:], 0).astype(np.int64)

    def positions(self) -> np.ndarray:
        """Next position of every row."""
        return self.mask.sum(axis=1)

    # --- continuous batching -----------------------------------------------------------------

    def select(self, rows) -> "KVCache":
        """A new cache holding only `rows` (e.g. drop finished sequences); trims common left padding."""
        rows = list(rows)
        mask = self.mask[rows]
        start = int(np.argmax(mask.any(axis=0))) if mask.any() else mask.shape[1]
        return self._gather([(self, r, start) for r in rows], self.capacity)

    @staticmethod
    def merge(caches: list["KVCache"], capacity: int | None = None) -> "KVCache":
        """Stack the rows of several caches into one, right aligned (shorter rows get left padding)."""
        if not caches:
            raise ConfigError("merge needs at least one cache")
        capacity = capacity or max(c.capacity for c in caches)
        return caches[0]._gather([(c, r, 0) for c in caches for r in range(c.batch)], capacity)

    @staticmethod
    def stack(rows: list[tuple["KVCache", int]], capacity: int) -> "KVCache":
        """One new cache of the given rows ((cache, row) pairs, from any caches), right aligned, with the
        common left padding trimmed: one copy of the KV. Memory while it runs: the sources, the new
        cache (len(rows) x capacity tokens) and one [rows, H, length, D] staging array."""
        if not rows:
            raise ConfigError("stack needs at least one row")
        length = max(int(c.mask[r].sum()) for c, r in rows)  # rows are right aligned: real tokens end each row
        return rows[0][0]._gather([(c, r, c.length - length if c.length >= length else 0) for c, r in rows], capacity)

    @staticmethod
    def stacked_bytes(rows: int, capacity: int, length: int, kv_bytes_per_token: int, io: "ModelIO") -> tuple[int, int]:
        """(bytes of a stacked cache, bytes of its staging array): kv_bytes_per_token counts every buffer."""
        staging = rows * length * io.kv_bytes_per_token() // (2 * io.num_layers)
        return rows * capacity * kv_bytes_per_token, staging

    def _gather(self, parts: list[tuple["KVCache", int, int]], capacity: int) -> "KVCache":
        length = max(c.length - start for c, _, start in parts)
        out = self._empty(len(parts), capacity)
        out.check_room(length)
        mask = np.zeros((len(parts), length), np.int64)
        for row, (c, r, start) in enumerate(parts):
            n = c.length - start
            mask[row, length - n:] = c.mask[r, start:]
        out.mask = mask
        h, d = self.io.num_kv_heads, self.io.head_dim
        for layer in range(self.io.num_layers):
            for kind in range(2):
                dst = np.zeros((len(parts), h, length, d), np.dtype(self.io.kv_dtype))
                for row, (c, r, start) in enumerate(parts):
                    n = c.length - start
                    dst[row, :, length - n:] = c.host_past(layer, kind)[r, :, start:]
                out.store_past(layer, kind, dst)
                del dst  # one staging array at a time
        return out

    # --- how a backend reaches the buffers (device caches override these) -------------------

    def _empty(self, batch: int, capacity: int) -> "KVCache":
        return KVCache(self.io, batch, capacity)

    def binding(self, layer: int, kind: int, new: int | None = None) -> tuple[int, tuple[int, ...]]:
        """(address, shape) of the past view, or of the present target when `new` is given."""
        v = self.past(layer, kind) if new is None else self.present_target(layer, kind, new)
        return v.ctypes.data, v.shape

    def host_past(self, layer: int, kind: int) -> np.ndarray:
        return self.past(layer, kind)

    def store_past(self, layer: int, kind: int, value: np.ndarray) -> None:
        self.past(layer, kind)[...] = value


@dataclass
class SharedKVCache(KVCache):
    """One buffer per layer and kind, [B, H, capacity, D], bound as both past and present: the graph
    appends the new keys in place (onnxruntime's GroupQueryAttention with a shared past/present
    buffer, the fused graph's form), so a step neither copies the cache nor needs a second buffer.
    Same rows, mask and left padding as KVCache; `past()` is a strided view of the used part."""

    def __post_init__(self):
        if self.buffers is None and self.batch >= 1 and self.capacity >= 1:
            n = self.batch * self.io.num_kv_heads * self.capacity * self.io.head_dim
            dt = np.dtype(self.io.kv_dtype)
            self.buffers = [[(np.zeros(n, dt),) for _ in range(2)] for _ in range(self.io.num_layers)]
        super().__post_init__()

    def _full(self, layer: int, kind: int) -> np.ndarray:
        h, d = self.io.num_kv_heads, self.io.head_dim
        return self.buffers[layer][kind][0].reshape(self.batch, h, self.capacity, d)

    def past(self, layer: int, kind: int) -> np.ndarray:
        return self._full(layer, kind)[:, :, : self.length]

    def present_target(self, layer: int, kind: int, new: int) -> np.ndarray:
        return self._full(layer, kind)[:, :, : self.length + new]

    def binding(self, layer: int, kind: int, new: int | None = None) -> tuple[int, tuple[int, ...]]:
        full = self._full(layer, kind)
        return full.ctypes.data, full.shape  # past and present: the same memory

    def advance(self, new_mask: np.ndarray) -> None:
        self.mask = np.concatenate([self.mask, new_mask.astype(np.int64)], axis=1)

    def rollback(self, length: int) -> None:
        """Keep the first `length` positions: the rows are laid out at capacity, so this sets the length
        (the dropped positions are overwritten by the next step); no copy."""
        if not 0 <= length <= self.length:
            raise ConfigError(f"cannot roll a KV cache of {self.length} tokens back to {length}")
        self.mask = self.mask[:, :length]

    def _empty(self, batch: int, capacity: int) -> "KVCache":
        return SharedKVCache(self.io, batch, capacity)
