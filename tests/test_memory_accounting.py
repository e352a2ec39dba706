"""The memory manager counts what the daemon really allocates for KV: the batched cache padded to its
longest row, the copy made when a sequence joins, prompts prefilled alone. Reference: the bytes of
the real numpy KV arrays (tracemalloc), with the scheduler and the daemon's adapter running them."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from edge_sdk.runtime.server.engine import SamplingParams
from edge_sdk.runtime.server.memory import MemoryManager, RequestTooLargeError, plan_layout
from edge_sdk.runtime.server.scheduler import Scheduler
from numpy_step_model import numpy_step_model

MIB = 2**20
CONTEXT = 1024
LONG = 900  # tokens in the one long prompt


def served(max_batch: int, pool_bytes: int):
    model = numpy_step_model(layers=4, kv_heads=2, head_dim=16, context=CONTEXT, max_batch=max_batch)  # 2 KiB/token
    layout = plan_layout(budget_bytes=pool_bytes + model.workspace_bytes, reserve_bytes=0, weights_bytes=0,
                         workspace_bytes=model.workspace_bytes, kv_bytes_per_token=model.kv_bytes_per_token,
                         kv_block_tokens=16, context_length=CONTEXT, kv_pool_max_bytes=pool_bytes)
    memory = MemoryManager(layout, context_length=CONTEXT)
    peak = [0]
    allocate = memory.pool.allocate

    def counting(n):  # the most blocks ever counted at once
        blocks = allocate(n)
        peak[0] = max(peak[0], memory.pool.num_used)
        return blocks

    memory.pool.allocate = counting
    return model, memory, Scheduler(model, memory, max_batch=max_batch, queue_timeout_s=600), peak


def workload(max_batch: int) -> list[tuple[int, int]]:
    """(prompt tokens, max_tokens): one long prompt, then short ones filling the batch and more that join
    while rows finish at different steps."""
    return [(LONG, 16)] + [(8 + i % 5, 4 + (i * 7) % 20) for i in range(max_batch + 3)]


def submit_all(sched, work):
    return [sched.submit([1 + (i + j) % 60 for j in range(p)], SamplingParams(max_tokens=m, temperature=0.0))
            for i, (p, m) in enumerate(work)]


def wait_done(reqs, timeout=120):
    deadline = time.monotonic() + timeout
    while any(r.finish_reason is None for r in reqs):
        assert time.monotonic() < deadline, "requests did not finish"
        time.sleep(0.01)


def run(sched, work):
    reqs = submit_all(sched, work)  # all queued before the loop starts: the batches are the same on every run
    sched.start()
    try:
        wait_done(reqs)
    finally:
        sched.stop()
    return reqs


def events(req):
    out = []
    while not req.events.empty():
        out.append(req.events.get_nowait())
    return out


@pytest.mark.parametrize("max_batch", [8, 32])
def test_counted_kv_matches_the_allocated_arrays(max_batch):
    model, memory, sched, peak = served(max_batch, 256 * MIB)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        reqs = run(sched, workload(max_batch))
        measured = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    counted = peak[0] * memory.layout.kv_block_bytes
    assert [r.finish_reason for r in reqs] == ["length"] * len(reqs)
    # the padded batch: every row holds the long prompt's length plus what any row may still append
    assert measured > max_batch * (LONG + 16) * model.kv_bytes_per_token
    assert abs(counted - measured) <= 0.10 * measured, (counted / MIB, measured / MIB)
    stats = memory.stats()
    assert stats["kv_blocks_used"] == stats["kv_blocks_padding"] == 0 and stats["reservations"] == 0
    assert stats["kv_blocks_peak"] == peak[0]


def test_a_batch_that_does_not_fit_waits_and_never_exceeds_the_pool():
    pool = 8 * MIB  # the long request alone fits, the long one padded into a batch of 8 does not
    model, memory, sched, peak = served(8, pool)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        reqs = run(sched, workload(8))
        measured = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert [r.finish_reason for r in reqs] == ["length"] * len(reqs)
    assert peak[0] <= memory.layout.kv_blocks
    assert measured <= 1.05 * pool
    assert memory.stats()["kv_blocks_used"] == 0


def test_a_request_whose_batch_can_never_fit_is_refused_not_left_waiting():
    # its own tokens fit the pool (check() passes), its prefill copy beside the batch does not
    model, memory, sched, _ = served(8, 2 * MIB)
    (long,) = run(sched, [(LONG, 16)])
    (ev,) = events(long)
    assert long.finish_reason == "error" and isinstance(ev.error, RequestTooLargeError)
    assert ev.error.http_status == 413 and "nothing else running" in ev.error.message
    assert memory.stats()["kv_blocks_used"] == 0


def test_memory_comes_back_on_error_cancel_and_stop():
    model, memory, sched, _ = served(8, 256 * MIB)
    model.backend.fail_next = True  # the first model call (a prefill) fails
    reqs = submit_all(sched, [(40, 500), (30, 500), (20, 500), (10, 3)])
    sched.start()
    try:
        wait_done(reqs[:1] + reqs[3:])
        assert reqs[0].finish_reason == "error" and reqs[3].finish_reason == "length"
        reqs[1].cancel()  # a client gone
        wait_done(reqs[1:2])
        assert reqs[1].finish_reason == "abort" and reqs[2].finish_reason is None
        assert memory.stats()["reservations"] == 1 and memory.stats()["kv_blocks_used"] > 0
    finally:
        sched.stop()  # stops with reqs[2] running
    assert reqs[2].finish_reason == "abort"
    stats = memory.stats()
    assert stats["kv_blocks_used"] == stats["kv_blocks_padding"] == stats["reservations"] == 0
    assert model._batch is None and not model._pending and not model._left
