"""Unified-memory manager: one budget, a KV block pool, admission by reservation.

On Jetson the GPU allocates from the same LPDDR as the CPU, so the daemon keeps a single budget
(the platform's allocatable bytes minus a reserve) and splits it between weights, workspace and a
pool of fixed-size KV blocks. A request reserves every block it can ever need (prompt + max_tokens)
when it is admitted, so a running request never runs out of memory half-way; one that can never fit
is refused (413), one that cannot fit now waits or is refused with a retry hint (503).

Running sequences share one batched cache whose rows are padded to the longest one, so the model
holds more than the sum of the reservations. The model states what it holds (`held_bytes`: its KV
bytes at their peak until the next step, the rebuild that lets a sequence join included); the rest
is kept as padding blocks in the same pool, so the pool counts what is really allocated.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from ...errors import MemoryBudgetError

MIB = 2**20
log = logging.getLogger(__name__)


class NoFreeBlocksError(MemoryBudgetError):
    """The KV block pool has fewer free blocks than asked for."""


class RequestTooLargeError(MemoryBudgetError):
    """A request that can never fit: longer than the context, or more KV than the whole pool."""

    http_status = 413


class MemoryBusyError(MemoryBudgetError):
    """A request that fits the pool but not what is free right now."""

    http_status = 503

    def __init__(self, message: str, *, hint: str | None = None, retry_after_s: float = 1.0):
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s


class BlockAllocator:
    """Fixed pool of KV block ids; allocate/free are O(n) in the blocks moved, never in the pool."""

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # stack: lowest id handed out first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError("cannot allocate a negative number of blocks")
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {len(self._free)} of {self.num_blocks} free")
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert b in self._used, f"KV block {b} freed twice or never allocated"
            self._used.remove(b)
            self._free.append(b)


@dataclass(frozen=True)
class MemoryLayout:
    """How the budget is split (bytes). kv_blocks * kv_block_bytes is the KV pool."""

    budget_bytes: int  # allocatable unified memory reported by the platform (or the emulated board)
    reserve_bytes: int  # kept free for the OS, other processes and allocator slack
    weights_bytes: int
    workspace_bytes: int
    kv_block_tokens: int
    kv_block_bytes: int
    kv_blocks: int

    @property
    def usable_bytes(self) -> int:
        return self.budget_bytes - self.reserve_bytes

    @property
    def kv_pool_bytes(self) -> int:
        return self.kv_blocks * self.kv_block_bytes

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {
            "usable_bytes": self.usable_bytes, "kv_pool_bytes": self.kv_pool_bytes}


def plan_layout(*, budget_bytes: int, reserve_bytes: int, weights_bytes: int, workspace_bytes: int,
                kv_bytes_per_token: int, kv_block_tokens: int, context_length: int,
                kv_pool_max_bytes: int | None = None) -> MemoryLayout:
    """Split the budget; refuse a model that cannot hold even one full-context sequence."""
    if kv_block_tokens <= 0 or kv_bytes_per_token <= 0:
        raise MemoryBudgetError(f"kv_block_tokens ({kv_block_tokens}) and KV bytes per token ({kv_bytes_per_token}) must be positive")
    block_bytes = kv_block_tokens * kv_bytes_per_token
    free_for_kv = budget_bytes - reserve_bytes - weights_bytes - workspace_bytes
    if kv_pool_max_bytes is not None:
        free_for_kv = min(free_for_kv, kv_pool_max_bytes)
    blocks = max(0, free_for_kv // block_bytes)
    one_sequence = -(-context_length // kv_block_tokens)
    if blocks < one_sequence:
        need = weights_bytes + workspace_bytes + one_sequence * block_bytes + reserve_bytes
        raise MemoryBudgetError(
            f"the model needs {need / MIB:.0f} MiB (weights {weights_bytes / MIB:.0f}, workspace {workspace_bytes / MIB:.0f}, "
            f"KV for one {context_length}-token sequence {one_sequence * block_bytes / MIB:.0f}, reserve {reserve_bytes / MIB:.0f}) "
            f"but the budget is {budget_bytes / MIB:.0f} MiB",
            hint="lower memory.reserve_mb or server.context_length, raise memory.kv_pool_max_mb, or use a smaller model / bigger board",
        )
    return MemoryLayout(budget_bytes, reserve_bytes, weights_bytes, workspace_bytes, kv_block_tokens, block_bytes, int(blocks))


@dataclass
class Reservation:
    request_id: str
    tokens: int
    blocks: list[int]


class MemoryManager:
    """Admission control over a MemoryLayout. Thread-safe: HTTP handlers ask, the scheduler frees."""

    def __init__(self, layout: MemoryLayout, *, context_length: int):
        self.layout = layout
        self.context_length = context_length
        self.pool = BlockAllocator(layout.kv_blocks)
        self._reservations: dict[str, Reservation] = {}
        self._padding: list[int] = []  # blocks the model holds beyond the reservations (batch padding)
        self._lock = threading.Lock()
        self.peak_blocks_used = 0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.layout.kv_block_tokens)

    def check(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Tokens the request needs; raises RequestTooLargeError if it can never be served."""
        total = prompt_tokens + max_new_tokens
        if total > self.context_length:
            raise RequestTooLargeError(
                f"this request needs {total} tokens ({prompt_tokens} in the prompt + {max_new_tokens} to generate) "
                f"but the model's context is {self.context_length} tokens",
                hint="shorten the prompt or lower max_tokens")
        if self.blocks_for(total) > self.pool.num_blocks:
            raise RequestTooLargeError(
                f"this request needs {self.blocks_for(total)} KV blocks but the pool holds {self.pool.num_blocks}",
                hint="lower max_tokens or raise the memory budget")
        return total

    def reserve(self, request_id: str, prompt_tokens: int, max_new_tokens: int, *,
                held_bytes: int | None = None) -> Reservation:
        """Reserve the request's blocks; with held_bytes (what the model will hold once this request
        joins, at its peak), also the padding beyond all reservations. Both or neither."""
        tokens = self.check(prompt_tokens, max_new_tokens)
        n = self.blocks_for(tokens)
        with self._lock:
            assert request_id not in self._reservations, f"request {request_id} reserved twice"
            pad = self._padding_for(held_bytes, n) if held_bytes is not None else len(self._padding)
            need = n + max(0, pad - len(self._padding))
            self._make_room(need, f"this request needs {n} (and {need - n} more for the padded batch)" if need > n
                            else f"this request needs {n}")
            r = Reservation(request_id, tokens, self.pool.allocate(n))
            self._reservations[request_id] = r
            self._set_padding(pad)
            return r

    def hold(self, held_bytes: int) -> None:
        """Grow the padding to what the model will hold (a reserved request joining the batch); raises
        MemoryBusyError, changing nothing, when it does not fit. Never shrinks (see settle)."""
        with self._lock:
            grow = self._padding_for(held_bytes) - len(self._padding)
            if grow > 0:
                self._make_room(grow, f"joining the batch pads it by {grow} more")
                self._set_padding(len(self._padding) + grow)

    def settle(self, held_bytes: int) -> None:
        """Set the padding to what the model holds now (after a step: rebuilds done, rows dropped)."""
        with self._lock:
            self._set_padding(self._padding_for(held_bytes))

    def release(self, request_id: str, *, held_bytes: int | None = None) -> None:
        """Free a request's blocks; with held_bytes, keep as padding what the model still holds (its
        row stays in the batched cache until the next rebuild)."""
        with self._lock:
            r = self._reservations.pop(request_id, None)
            if r is not None:
                self.pool.free(r.blocks)
            if held_bytes is not None:
                self._set_padding(self._padding_for(held_bytes))

    def _padding_for(self, held_bytes: int, extra_blocks: int = 0) -> int:
        reserved = sum(len(r.blocks) for r in self._reservations.values()) + extra_blocks
        over = held_bytes - reserved * self.layout.kv_block_bytes
        return max(0, -(-over // self.layout.kv_block_bytes))

    def _make_room(self, n: int, what: str) -> None:
        if self.pool.num_free < n:
            raise MemoryBusyError(f"the KV pool has {self.pool.num_free} of {self.pool.num_blocks} blocks free and {what}",
                                  hint="retry when running requests finish")

    def _set_padding(self, blocks: int) -> None:
        if blocks < len(self._padding):
            self.pool.free([self._padding.pop() for _ in range(len(self._padding) - blocks)])
        elif blocks > len(self._padding):
            grow = blocks - len(self._padding)
            if self.pool.num_free < grow:  # admission predicted less than the model holds: a bug, say so
                log.warning("the model holds %d KV blocks more than the pool has free", grow - self.pool.num_free)
                grow = self.pool.num_free
            self._padding += self.pool.allocate(grow)
        self.peak_blocks_used = max(self.peak_blocks_used, self.pool.num_used)

    @property
    def running(self) -> int:
        return len(self._reservations)

    def stats(self) -> dict:
        with self._lock:
            lay = self.layout
            used = self.pool.num_used
            return {
                "budget_bytes": lay.budget_bytes, "reserve_bytes": lay.reserve_bytes, "weights_bytes": lay.weights_bytes,
                "workspace_bytes": lay.workspace_bytes, "kv_blocks_total": lay.kv_blocks, "kv_blocks_used": used,
                "kv_blocks_padding": len(self._padding), "kv_blocks_peak": self.peak_blocks_used,
                "kv_used_bytes": used * lay.kv_block_bytes, "kv_pool_bytes": lay.kv_pool_bytes,
                "accounted_bytes": lay.weights_bytes + lay.workspace_bytes + used * lay.kv_block_bytes,
                "reservations": len(self._reservations),
            }


def process_rss_bytes(pid: int | None = None) -> int:
    """Resident set size from /proc (no psutil on the device)."""
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
