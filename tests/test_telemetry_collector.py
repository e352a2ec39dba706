"""Collector, readings sources, state directory and key handling."""

import threading
from dataclasses import dataclass

import pytest

from edge_sdk.errors import ConfigError, TelemetryError
from edge_sdk.runtime.telemetry import records
from edge_sdk.runtime.telemetry.collector import ALERT, EVENT, SAMPLE, Telemetry, flatten, proc_readings
from edge_sdk.runtime.telemetry.queue import TelemetryQueue
from edge_sdk.runtime.telemetry.uplink import generate_key, load_key, state_dir


def decoded(q):
    schemas, out = {}, []
    for r in q.pending(0, 10000):
        if r.kind == records.SCHEMA_KIND:
            records.apply_schema(schemas, r.body)
        else:
            out.append((records.KINDS[r.kind], r.priority, records.decode_record(r.body, schemas)))
    return out


@dataclass
class Rail:
    mw: int
    avg_mw: int


def test_flatten_nested_readings():
    snap = {"rails": {"VDD_IN": Rail(5000, 4800)}, "cpus": [{"mhz": 729}, {"mhz": 1200}], "tj": 52.5, "mode": None}
    assert flatten(snap) == {"rails.VDD_IN.mw": 5000, "rails.VDD_IN.avg_mw": 4800, "cpus.0.mhz": 729,
                             "cpus.1.mhz": 1200, "tj": 52.5, "mode": None}


def test_metrics_and_events_from_many_threads(tmp_path):
    q = TelemetryQueue(tmp_path / "q.sqlite")
    tel = Telemetry(q, lambda: {"tj_mc": 52562}, interval=1)

    def worker(n):
        for i in range(50):
            tel.count("requests")
            tel.record_metric("tokens_per_s", 30.5)
        tel.event("refused_request", reason="kv full", worker=n)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tel.record_metric("queue_depth", 3)
    tel.sample()
    tel.event("thermal_step", ALERT, tj_c=95.0)
    rows = decoded(q)
    assert [(k, p) for k, p, _ in rows] == [("event", EVENT)] * 4 + [("sample", SAMPLE), ("event", ALERT)]
    assert sorted(r["worker"] for _, _, r in rows[:4]) == [0, 1, 2, 3]
    assert rows[4][2] == {"tj_mc": 52562, "metric.tokens_per_s": 30.5, "metric.queue_depth": 3,
                          "count.requests": 200, "queue.dropped": 0}


def test_failing_readings_still_sample_metrics(tmp_path):
    from edge_sdk.errors import PlatformError

    def broken():
        raise PlatformError("sysfs gone")

    q = TelemetryQueue(tmp_path / "q.sqlite")
    tel = Telemetry(q, broken, interval=1)
    tel.record_metric("ttft_ms", 120)
    tel.sample()
    assert decoded(q)[0][2] == {"readings_error": "sysfs gone", "metric.ttft_ms": 120, "queue.dropped": 0}


def test_run_samples_at_the_interval_and_set_interval_wakes_it(tmp_path):
    q = TelemetryQueue(tmp_path / "q.sqlite")
    tel = Telemetry(q, lambda: {"x": 1}, interval=3600)
    stop = threading.Event()
    t = threading.Thread(target=tel.run, args=(stop,))
    t.start()
    try:
        assert _wait(lambda: len(decoded(q)) == 1)
        tel.set_interval(0.05)  # the hour-long wait ends now
        assert _wait(lambda: len(decoded(q)) >= 4)
    finally:
        stop.set()
        t.join(timeout=30)
    assert not t.is_alive()
    with pytest.raises(ConfigError, match="interval"):
        tel.set_interval(0)


def _wait(cond, timeout=30.0):
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_proc_readings_from_a_fake_root(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/loadavg").write_text("0.52 0.40 0.30 1/200 999\n")
    (tmp_path / "proc/meminfo").write_text("MemTotal:       62841000 kB\nMemFree: 1 kB\nMemAvailable:   50000000 kB\nNvMapMemUsed:     123456 kB\n")
    for i, (kind, temp) in enumerate([("cpu-thermal", "52562"), ("tj-thermal", "53000"), ("cv0-thermal", "")]):
        zone = tmp_path / f"sys/class/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(temp + "\n")
    assert proc_readings(tmp_path)() == {"load1": 0.52, "mem.MemTotal_kb": 62841000, "mem.MemAvailable_kb": 50000000,
                                         "mem.NvMapMemUsed_kb": 123456, "temp_mc.cpu-thermal": 52562,
                                         "temp_mc.tj-thermal": 53000}


def test_state_dir_precedence(monkeypatch, tmp_path):
    env = {"EDGE_SDK_STATE_DIR": str(tmp_path / "env"), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert state_dir(tmp_path / "flag", env, False) == tmp_path / "flag"
    assert state_dir(None, env, False) == tmp_path / "env"
    del env["EDGE_SDK_STATE_DIR"]
    assert state_dir(None, env, False) == tmp_path / "xdg" / "edge-sdk"
    assert str(state_dir(None, env, True)) == "/var/lib/edge-sdk"
    monkeypatch.setenv("EDGE_SDK_STATE_DIR", str(tmp_path / "cli"))  # the CLI passes its environment in
    from edge_sdk.cli._common import state_dir as cli_state_dir

    assert cli_state_dir(None) == tmp_path / "cli"


def test_keys(tmp_path):
    path = generate_key(tmp_path / "k")
    assert len(load_key(path)) == 32
    (tmp_path / "short").write_text("00" * 8)
    with pytest.raises(TelemetryError, match="at least 16"):
        load_key(tmp_path / "short")
    (tmp_path / "text").write_text("not hex")
    with pytest.raises(TelemetryError, match="not hex"):
        load_key(tmp_path / "text")
    with pytest.raises(TelemetryError, match="keygen"):
        load_key(tmp_path / "missing")
