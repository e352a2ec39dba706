"""The read-bandwidth probe: its kernels are reductions over the whole buffer, its buffer is sized past
the last-level cache, and a decode share above 100 % of the probed bound is flagged as the probe's fault."""

import json
import math
import threading

import numpy as np
import pytest

from edge_sdk.runtime.generate import bench as b
from test_runtime_loader import make_toy_bundle

REFERENCE = {  # what each kernel computes, in exact arithmetic on small integers
    "dot": lambda x: float(sum(int(v) ** 2 for v in x)),
    "max": lambda x: max(x.view(np.int64).tolist()),
}


def marked_buffer(n: int) -> np.ndarray:
    x = np.zeros(n, np.float32)
    x[[0, n // 3, -1]] = [1.0, 2.0, 7.0]  # the largest value last: a reader that stops short misses it
    return x


@pytest.mark.parametrize("name", sorted(b.READ_KERNELS))
def test_each_kernel_is_its_reduction(name):
    x = marked_buffer(4096)
    assert b.READ_KERNELS[name](x) == REFERENCE[name](x)
    assert REFERENCE[name](x) != REFERENCE[name](x[:-2])  # the last element decides the result


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(b.READ_KERNELS))
def test_threads_together_read_the_whole_buffer(name, threads):
    x = marked_buffer(2 * threads * 1000)
    slices = b.split_for_threads(x, threads)
    assert sum(len(s) for s in slices) == len(x)
    seconds, results = b.timed_read(b.READ_KERNELS[name], slices)
    assert seconds > 0
    combined = sum(results) if name == "dot" else max(results)
    assert combined == REFERENCE[name](x)


def test_probe_returns_a_positive_finite_bandwidth():
    gbps = b.read_bandwidth_gbps(threads=2, mb_per_thread=1, repeats=1)
    assert math.isfinite(gbps) and gbps > 0


@pytest.mark.parametrize("threads, memory_mb, llc_mb, expected", [
    (2, 23 * 1024, 32, 512),     # this kind of machine: 1 GiB in all, 32x its L3
    (2, 23 * 1024, 480, 960),    # a 480 MiB L3: 4x the cache, not 2x
    (6, 8 * 1024, 4, 170),       # an 8 GiB board: 1/8 of the memory
    (12, 1024, 0, 64),           # the floor
])
def test_buffer_is_sized_past_the_cache(threads, memory_mb, llc_mb, expected):
    mb = b.default_mb_per_thread(threads, memory_mb, llc_mb)
    assert mb == expected and mb * threads >= 4 * llc_mb


def test_last_level_cache_is_the_highest_level(tmp_path):
    for i, (level, size) in enumerate([(1, "48K"), (1, "32K"), (2, "1024K"), (3, "32768K"), (4, "bogus")]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{i}" / "size").write_text(f"{size}\n")
    assert b.last_level_cache_bytes(str(tmp_path)) == 32 << 20
    assert b.last_level_cache_bytes(str(tmp_path / "absent")) == 0


@pytest.mark.parametrize("ratio, text", [
    (0.64, "64 % of the probed bound"),
    (1.0, "100 % of the probed bound"),
    (1.04, "104 % of the probed bound: the bandwidth probe under-reads"),
    (1.31, "131 % of the probed bound: the bandwidth probe under-reads"),
    (None, "no bound (nothing read per token)"),
])
def test_share_above_the_bound_blames_the_probe(ratio, text):
    assert b.roofline_share_text(ratio) == text


@pytest.mark.parametrize("probe_gbps, flagged", [(1e-6, True), (1e6, False)])
def test_cli_bench_flags_a_probe_that_under_reads(tmp_path, monkeypatch, capsys, probe_gbps, flagged):
    from edge_sdk.cli.main import main

    bundle = tmp_path / "bundle"
    make_toy_bundle(bundle)
    monkeypatch.setattr(b, "read_bandwidth_gbps", lambda *a, **k: probe_gbps)
    argv = ["bench", str(bundle), "--provider", "cpu", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1"]
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("roofline"))
    assert ("the bandwidth probe under-reads" in line) == flagged
    assert main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bandwidth_probe_under_reads"] is flagged


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_pass_spans_all_reading(monkeypatch, threads):
    """On a clock each read advances by 1 s, a pass lasts exactly `threads` seconds: every read falls
    between the first thread's start and the last one's end, whoever is scheduled first."""
    import threading

    lock, now = threading.Lock(), [0.0]

    def clock():
        with lock:
            return now[0]

    def read(x):
        with lock:
            now[0] += 1.0
        return float(x.sum())

    monkeypatch.setattr(b.time, "perf_counter", clock)
    seconds, results = b.timed_read(read, b.split_for_threads(np.ones(2 * threads, np.float32), threads))
    assert seconds == threads and sum(results) == 2 * threads
