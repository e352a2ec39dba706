"""Paging I/O: the storage throttle (token bucket) and the aligned reader, against hand-computed values."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from edge_sdk.errors import BundleError, MemoryBudgetError
from edge_sdk.runtime.paging.buffers import Ledger
from edge_sdk.runtime.token_bucket import TokenBucket
from edge_sdk.paging_model import PAGE
from edge_sdk.runtime.paging.reader import LayerReader, WeightsFile


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.slept = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.slept += s
        self.t += s


def test_token_bucket_paces_to_the_rate():
    clock = FakeClock()
    tb = TokenBucket(100e6, capacity=10_000_000, clock=clock, sleep=clock.sleep)
    for _ in range(30):
        tb.pace(10_000_000)
    # 300 MB at 100 MB/s with a 10 MB burst: 2.9 s of waiting
    assert clock.slept == pytest.approx(2.9)


def test_token_bucket_refills_while_idle():
    clock = FakeClock()
    tb = TokenBucket(1e6, capacity=1_000_000, clock=clock, sleep=clock.sleep)
    tb.pace(1_000_000)
    clock.t += 0.5
    tb.pace(1_000_000)
    assert clock.slept == pytest.approx(0.5)


@pytest.fixture
def weights(tmp_path):
    data = (np.arange(12 * PAGE, dtype=np.uint32) * 2654435761 % 251).astype(np.uint8)
    path = tmp_path / "model.weights"
    path.write_bytes(data.tobytes())
    return path, data


@pytest.mark.parametrize("direct", [True, False])
def test_reader_reads_exact_bytes(weights, direct):
    path, data = weights
    ledger = Ledger(10 * PAGE)
    wf = WeightsFile(path, len(data), direct=direct)
    buf = ledger.aligned("a", 3 * PAGE - 100)
    assert buf.ctypes.data % PAGE == 0 and buf.nbytes == 3 * PAGE
    wf.read_into(buf, 4 * PAGE, 3 * PAGE - 100)
    assert np.array_equal(buf[: 3 * PAGE - 100], data[4 * PAGE: 7 * PAGE - 100])
    assert wf.pread(10, 5) == data[5:15].tobytes()
    wf.close()


def test_reader_is_throttled_to_the_board_speed(weights):
    path, data = weights
    clock = FakeClock()
    wf = WeightsFile(path, len(data), TokenBucket(PAGE * 10, capacity=PAGE, clock=clock, sleep=clock.sleep))
    buf = np.empty(12 * PAGE + PAGE, np.uint8)
    buf = buf[(-buf.ctypes.data) % PAGE:][: 12 * PAGE]
    wf.read_into(buf, 0, 12 * PAGE)
    assert clock.slept == pytest.approx(1.1)  # 12 pages at 10 pages/s, one page of burst
    wf.close()


def test_layer_reader_cycles_and_bounds_prefetch(weights):
    path, data = weights
    ledger = Ledger(4 * PAGE)
    slots = [ledger.aligned(f"s{k}", 2 * PAGE) for k in range(2)]
    layers = {i: (i * 2 * PAGE, 2 * PAGE) for i in range(6)}
    with pytest.raises(MemoryBudgetError):
        ledger.aligned("third", PAGE)
    r = LayerReader(WeightsFile(path, len(data)), layers, (1, 3, 4), slots)
    for _ in range(3):  # three forward passes
        for i in (1, 3, 4):
            slot, buf = r.get(i)
            assert np.array_equal(buf, data[i * 2 * PAGE:(i + 1) * 2 * PAGE])
            r.release(slot)
    # a pass that stopped after layer 1 is skipped over: the next pass starts again at layer 1
    slot, _ = r.get(1)
    r.release(slot)
    slot, buf = r.get(1)
    assert np.array_equal(buf, data[2 * PAGE:4 * PAGE])
    r.release(slot)
    r.close()
    assert not r.thread.is_alive()
    assert ledger.peak == 4 * PAGE


def test_weights_file_shorter_than_the_manifest(weights):
    path, data = weights
    with pytest.raises(BundleError, match="truncated"):
        WeightsFile(path, len(data) + 1)


def test_freed_buffers_stay_in_the_heap():
    """After keep_freed_buffers, a layer-sized allocation comes from glibc's heap (already faulted in
    after the first use) instead of a fresh mapping, and freeing it keeps it there. Run in a child
    process: the thresholds are process-wide."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import ctypes, json
        from edge_sdk.runtime.paging import heap
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]

        def region(addr):
            for line in open("/proc/self/maps"):
                span, rest = line.split(" ", 1)
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= addr < hi:
                    return rest.split()[-1] if len(rest.split()) >= 5 else "anonymous", hi - lo
            return None, 0

        n = 24 << 20
        before = libc.malloc(n); b_region, b_size = region(before); libc.free(before)
        got = heap.keep_freed_buffers(n, 4 * n)
        first = libc.malloc(n); libc.free(first)
        second = libc.malloc(n); s_region, _ = region(second); libc.free(second)
        print(json.dumps({"got": got, "before": [b_region, b_size], "first": first, "second": second, "second_region": s_region}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert r["got"]["set"] and r["got"]["mmap_threshold"] == 25 << 20 and r["got"]["trim_threshold"] == 96 << 20
    assert r["before"][0] == "anonymous" and r["before"][1] >= 24 << 20  # default thresholds: a mapping of its own
    assert r["second_region"] == "[heap]" and r["second"] == r["first"]  # reused, not mapped again
