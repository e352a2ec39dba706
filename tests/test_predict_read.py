"""--dry-run's prediction of the time spent reading the checkpoint: arithmetic and the cold read."""

import os

import pytest

pytest.importorskip("torch")

from edge_sdk.converters import predict  # noqa: E402


def test_read_time_is_reads_times_bytes_over_the_cold_speed():
    assert predict.read_seconds(300 << 20, 100 << 20) == 2 * 3.0  # read for quantize and for the float model
    assert predict.read_seconds(300 << 20, 100 << 20, reads=1) == 3.0
    assert predict.read_seconds(300 << 20, None) == 0.0  # no measurement: left out
    assert predict.predicted_seconds(10.0, 28, 5.0, 6.0, 40.0) == 10 + 28 * 11 + 40


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_cold_read_speed_reads_the_sample_and_divides_by_the_clock(tmp_path):
    f = tmp_path / "shard.safetensors"
    f.write_bytes(os.urandom(3 << 20))
    ticks = iter([100.0, 102.0])
    assert predict.cold_read_speed(f, sample=1 << 20, clock=lambda: next(ticks)) == (1 << 20) / 2.0
    ticks = iter([0.0, 4.0])
    assert predict.cold_read_speed(f, sample=64 << 20, clock=lambda: next(ticks)) == (3 << 20) / 4.0  # whole file
