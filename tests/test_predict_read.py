"""--dry-run's time prediction: per-stage arithmetic and the read, write and hash probes."""

import os

import pytest

pytest.importorskip("torch")

from edge_sdk.converters import predict  # noqa: E402


def test_read_time_is_reads_times_bytes_over_the_cold_speed():
    assert predict.read_seconds(300 << 20, 100 << 20) == 3.0
    assert predict.read_seconds(300 << 20, 100 << 20, reads=2) == 2 * 3.0
    assert predict.read_seconds(300 << 20, None) == 0.0  # no measurement: left out


COSTS = {"load": 10.0, "quantize": 2.0, "read": 0.5, "export": 0.75, "ends": 6.0, "graph": 3.0, "write_speed": 1e9,
         "accuracy": 4.0, "heads": 12.0, "verify_layer": 3.5, "verify_once": 5.0, "hash_speed": 2e9}


def test_stage_seconds_per_layer_and_once():
    got = predict.stage_seconds(28, COSTS, 5_000_000_000, verify=True)
    assert got == {"load": 10.0,
                   "quantize": 28 * (2.0 + 0.5),  # compute + one cold read of the layer
                   "export": 28 * 0.75 + 6.0 + 3.0 + 5.0,  # pack per layer, ends, graph trace, 5 GB at 1 GB/s fsynced
                   "accuracy": 28 * (4.0 + 0.5) + 12.0,  # the float model reads the layer again
                   "package": 2.5,  # sha256 of 5 GB at 2 GB/s
                   "verify": 28 * 3.5 + 5.0}  # per layer, and the tail once
    assert sum(got.values()) == 10 + 70 + 35 + 138 + 2.5 + 103


def test_stage_seconds_leave_out_what_was_not_measured():
    got = predict.stage_seconds(4, COSTS | {"write_speed": None, "hash_speed": None}, 5_000_000_000, verify=False)
    assert "verify" not in got and got["package"] == 0.0 and got["export"] == 4 * 0.75 + 6.0 + 3.0


def test_write_speed_writes_and_fsyncs_the_sample_then_removes_it(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(predict.os, "fsync", lambda fd: synced.append(os.fstat(fd).st_size))
    ticks = iter([5.0, 9.0])
    assert predict.write_speed(tmp_path, sample=(3 << 20) + 5, clock=lambda: next(ticks)) == ((3 << 20) + 5) / 4.0
    assert synced == [(3 << 20) + 5] and list(tmp_path.iterdir()) == []


def test_hash_speed_divides_the_sample_by_the_clock():
    ticks = iter([1.0, 1.5])
    assert predict.hash_speed(sample=1 << 20, clock=lambda: next(ticks)) == (1 << 20) / 0.5


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_cold_read_speed_reads_the_sample_and_divides_by_the_clock(tmp_path):
    f = tmp_path / "shard.safetensors"
    f.write_bytes(os.urandom(3 << 20))
    ticks = iter([100.0, 102.0])
    assert predict.cold_read_speed(f, sample=1 << 20, clock=lambda: next(ticks)) == (1 << 20) / 2.0
    ticks = iter([0.0, 4.0])
    assert predict.cold_read_speed(f, sample=64 << 20, clock=lambda: next(ticks)) == (3 << 20) / 4.0  # whole file


def test_evaluation_windows_follow_the_held_out_tokens():
    # nll cuts windows of 512 overlapping by one token; a last piece under 2 tokens is dropped
    assert [predict.eval_windows(n) for n in (290, 512, 513, 1022, 1023, 1200)] == [1, 1, 2, 2, 2, 3]
