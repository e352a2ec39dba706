"""Scheduler over the deterministic step model: FCFS admission, batching limit, queue limits,
cancellation and the SIGTERM drain (finish within the deadline, then abort)."""

from __future__ import annotations

import asyncio
import time

import pytest

from edge_sdk.runtime.server.engine import SamplingParams
from edge_sdk.runtime.server.memory import MemoryBusyError
from edge_sdk.runtime.server.scheduler import ServiceBusyError
from test_server_helpers import FakeStepModel, make_state, reference_completion

GREEDY = dict(temperature=0.0)


async def finish(req) -> tuple[str, str | None, Exception | None]:
    text = []
    while True:
        ev = await req.events.get()
        if ev.kind == "text":
            text.append(ev.text)
        elif ev.kind == "done":
            return "".join(text), ev.finish_reason, None
        else:
            return "".join(text), None, ev.error


async def generating(req, timeout_s=60.0):
    """Wait (bounded) until the scheduler thread runs req: its first token is out."""
    deadline = time.monotonic() + timeout_s
    while not req.completion_ids:
        assert time.monotonic() < deadline, f"not admitted within {timeout_s} s"
        await asyncio.sleep(0.01)


def run_with(state, coro_fn):
    state.scheduler.start()
    try:
        return asyncio.run(coro_fn(state.scheduler))
    finally:
        state.scheduler.stop()


@pytest.mark.parametrize("max_batch", [1, 2, 3, 8])
def test_batch_never_exceeds_max_batch_and_outputs_match(max_batch):
    model = FakeStepModel()
    state = make_state(model, max_batch=max_batch)
    prompts = [f"p{i}" for i in range(6)]

    async def go(s):
        loop = asyncio.get_running_loop()
        reqs = [s.submit(list(p.encode()), SamplingParams(max_tokens=10, **GREEDY), loop) for p in prompts]
        return await asyncio.gather(*(finish(r) for r in reqs))

    results = run_with(state, go)
    assert [r[0] for r in results] == [reference_completion(list(p.encode()), 10)[0] for p in prompts]
    assert max(model.batch_sizes) <= max_batch
    if max_batch > 1:
        assert max(model.batch_sizes) > 1


def test_first_come_first_served_when_memory_is_short():
    """A request that does not fit holds back the smaller ones behind it (no overtaking)."""
    model = FakeStepModel(context_length=256, step_delay_s=0.002)
    state = make_state(model, kv_blocks_tokens=256)
    order = []

    async def go(s):
        loop = asyncio.get_running_loop()
        a = s.submit(list(b"a"), SamplingParams(max_tokens=150, **GREEDY), loop)  # 10 blocks of 16
        b = s.submit(list(b"b"), SamplingParams(max_tokens=150, **GREEDY), loop)  # must wait for a
        c = s.submit(list(b"c"), SamplingParams(max_tokens=10, **GREEDY), loop)  # would fit now, but waits behind b

        async def track(name, r):
            first = await r.events.get()
            order.append(name)
            await r.events.put(first)
            return await finish(r)
        return await asyncio.gather(track("a", a), track("b", b), track("c", c))

    results = run_with(state, go)
    assert order == ["a", "b", "c"]
    assert [r[1] for r in results] == ["length"] * 3


def test_queue_limit_and_queue_timeout_give_busy_errors():
    model = FakeStepModel(context_length=256, step_delay_s=0.01)
    state = make_state(model, kv_blocks_tokens=256, max_queue=1, queue_timeout_s=0.2)

    async def go(s):
        loop = asyncio.get_running_loop()
        big = s.submit(list(b"x"), SamplingParams(max_tokens=200, **GREEDY), loop)
        await generating(big)  # admitted: holds 13 of 16 blocks
        waiting = s.submit(list(b"y"), SamplingParams(max_tokens=200, **GREEDY), loop)
        with pytest.raises(ServiceBusyError, match="already waiting"):
            s.submit(list(b"z"), SamplingParams(max_tokens=5, **GREEDY), loop)
        _, _, err = await finish(waiting)
        big.cancel()
        return err, await finish(big)

    err, (_, reason, _) = run_with(state, go)
    assert isinstance(err, MemoryBusyError) and "waited" in str(err) and err.retry_after_s == 3
    assert reason == "abort"
    assert state.memory.stats()["kv_blocks_used"] == 0


def test_cancelled_waiting_request_is_dropped_without_running():
    model = FakeStepModel(context_length=256, step_delay_s=0.005)
    state = make_state(model, kv_blocks_tokens=256)

    async def go(s):
        loop = asyncio.get_running_loop()
        a = s.submit(list(b"a"), SamplingParams(max_tokens=100, **GREEDY), loop)
        b = s.submit(list(b"b"), SamplingParams(max_tokens=200, **GREEDY), loop)
        b.cancel()
        return await finish(a), await finish(b), b

    (ta, ra, _), (tb, rb, _), b = run_with(state, go)
    assert ra == "length" and (tb, rb) == ("", "abort") and b.completion_ids == []


def test_drain_lets_short_requests_finish_and_aborts_at_the_deadline():
    model = FakeStepModel(step_delay_s=0.02)  # the long one needs at least 8 s, the short one 0.1 s
    state = make_state(model)

    async def go(s):
        loop = asyncio.get_running_loop()
        short = s.submit(list(b"short"), SamplingParams(max_tokens=5, **GREEDY), loop)
        long = s.submit(list(b"long"), SamplingParams(max_tokens=400, **GREEDY), loop)
        await generating(long)
        clean = await asyncio.to_thread(s.drain, 3.0)
        with pytest.raises(ServiceBusyError, match="shutting down"):
            s.submit(list(b"late"), SamplingParams(max_tokens=5), loop)
        return clean, await finish(short), await finish(long), long

    clean, (ts, rs, _), (tl, rl, _), long = run_with(state, go)
    assert not clean
    assert (ts, rs) == (reference_completion(list(b"short"), 5)[0], "length")
    assert rl == "abort" and 0 < len(long.completion_ids) < 400
    assert tl == reference_completion(list(b"long"), len(long.completion_ids))[0]  # what was streamed is right
    assert state.memory.stats()["kv_blocks_used"] == 0 and model.seqs == {}
