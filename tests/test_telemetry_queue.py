"""Persistent queue: durability across kill -9, bound by bytes, drop order and counts, command counter."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from edge_sdk.errors import TelemetryError
from edge_sdk.runtime.telemetry import records
from edge_sdk.runtime.telemetry.queue import PRIORITY_SCHEMA, RECORD_OVERHEAD, TelemetryQueue


def rec(i, pad=0):
    return {"i": i, "pad": "x" * pad}


def test_records_survive_reopen_in_order_with_schema_first(tmp_path):
    q = TelemetryQueue(tmp_path / "q.sqlite")
    seqs = q.add([(rec(i), 1, 10, 1000 + i) for i in range(5)])
    assert seqs == [2, 3, 4, 5, 6]  # seq 1 is the schema record
    stream = q.stream_id
    q.close()
    q = TelemetryQueue(tmp_path / "q.sqlite")
    assert q.stream_id == stream
    pending = q.pending(0)
    assert [r.seq for r in pending] == [1, 2, 3, 4, 5, 6]
    assert pending[0].kind == records.SCHEMA_KIND and pending[0].priority == PRIORITY_SCHEMA
    schemas = {}
    records.apply_schema(schemas, pending[0].body)
    assert records.decode_record(pending[3].body, schemas) == rec(2)
    # the same field set reuses the schema after reopening
    assert q.add([(rec(9), 1, 10, 0)]) == [7]


def test_ack_removes_and_sequence_numbers_are_never_reused(tmp_path):
    q = TelemetryQueue(tmp_path / "q.sqlite")
    q.add([(rec(i), 1, 10, 0) for i in range(4)])
    assert q.ack(5) == 5 and q.acked == 5
    assert q.ack(3) == 0 and q.acked == 5  # an old acknowledgement changes nothing
    assert q.pending(0) == []
    q.close()
    q = TelemetryQueue(tmp_path / "q.sqlite")
    assert q.add([(rec(1), 1, 10, 0)]) == [6]
    assert q.stats()["bytes"] == len(q.pending(0)[0].body) + RECORD_OVERHEAD


def test_full_queue_drops_oldest_lowest_priority_first_and_counts(tmp_path):
    q = TelemetryQueue(tmp_path / "q.sqlite", max_bytes=4096)
    q.add([(rec(0, 100), 2, 200, 0)])  # an alert
    q.add([(rec(i, 100), 1, 10, 0) for i in range(1, 11)])  # samples
    q.add([(rec(i, 100), 2, 100, 0) for i in range(11, 16)])  # events
    body = len(q.pending(0)[1].body) + RECORD_OVERHEAD
    fits = (4096 - len(q.pending(0)[0].body) - RECORD_OVERHEAD) // body
    q.add([(rec(i, 100), 1, 10, 0) for i in range(16, 46)])  # 30 more samples overflow the queue
    kept = [r for r in q.pending(0) if r.kind != records.SCHEMA_KIND]
    kept_i = [records.decode_record(r.body, {1: ("i", "pad")})["i"] for r in kept]
    assert len(kept) == fits
    dropped = 46 - fits
    assert q.dropped == dropped and q.drops_by_priority() == {10: dropped}
    # the alert and the events stay; the newest samples stay; the oldest samples went
    assert kept_i[:6] == [0, 11, 12, 13, 14, 15]
    samples = sorted(i for i, r in zip(kept_i, kept) if r.priority == 10)
    assert samples == list(range(46 - len(samples), 46))
    assert q.stats()["bytes"] <= 4096


def test_long_schema_is_split_into_records_that_fit_a_frame(tmp_path):
    q = TelemetryQueue(tmp_path / "q.sqlite")
    wide = {f"rails.VDD_SOMETHING_LONG_{i}.avg_mw": i for i in range(120)}
    (seq,) = q.add([(wide, 1, 10, 0)])
    parts = [r for r in q.pending(0) if r.kind == records.SCHEMA_KIND]
    assert len(parts) > 1 and all(len(p.body) <= 900 for p in parts) and seq == len(parts) + 1
    schemas = {}
    for p in parts:
        records.apply_schema(schemas, p.body)
    assert records.decode_record(q.pending(0)[-1].body, schemas) == wide


def test_events_go_once_samples_are_gone(tmp_path):
    q = TelemetryQueue(tmp_path / "q.sqlite", max_bytes=4096)
    q.add([(rec(i, 200), 2, 100, 0) for i in range(30)])
    assert q.drops_by_priority() == {100: q.dropped} and q.dropped > 0
    assert q.pending(0)[0].kind == records.SCHEMA_KIND  # never dropped


def test_bad_records_are_refused(tmp_path):
    q = TelemetryQueue(tmp_path / "q.sqlite")
    with pytest.raises(TelemetryError, match="split"):
        q.add([(rec(0, 2000), 1, 10, 0)])
    with pytest.raises(TelemetryError, match="priority"):
        q.add([(rec(0), 1, 255, 0)])
    with pytest.raises(TelemetryError, match="cannot encode"):
        q.add([({"x": object()}, 1, 10, 0)])
    assert q.pending(0) == []  # nothing half-written
    with pytest.raises(TelemetryError, match="at least"):
        TelemetryQueue(tmp_path / "small.sqlite", max_bytes=100)


def test_command_counter_is_monotonic_and_persisted(tmp_path):
    q = TelemetryQueue(tmp_path / "q.sqlite")
    assert q.accept_command(5) and not q.accept_command(5) and not q.accept_command(3)
    q.store_result(5, b"ok")
    q.close()
    q = TelemetryQueue(tmp_path / "q.sqlite")
    assert q.last_command() == (5, b"ok")
    assert not q.accept_command(4) and q.accept_command(6)
    assert q.last_command() == (6, None)


def test_wal_mode_and_sync_settings(tmp_path):
    q = TelemetryQueue(tmp_path / "q.sqlite")
    q.add([(rec(0), 1, 10, 0)])
    db = sqlite3.connect(tmp_path / "q.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert q._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL after an add
    q.ack(2)
    assert q._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL after a delete


WRITER = textwrap.dedent("""
    import sys
    from edge_sdk.runtime.telemetry.queue import TelemetryQueue
    q = TelemetryQueue(sys.argv[1])
    i = 0
    while True:
        seqs = q.add([({"i": i, "pad": "y" * 50}, 1, 10, i)])
        if i % 7 == 0:
            q.ack(seqs[0] - 20)
        print(seqs[0], flush=True)
        i += 1
""")


def test_kill_9_loses_no_committed_record(tmp_path):
    path = tmp_path / "q.sqlite"
    reported = []
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(40 + 17 * round_):
            reported.append(int(proc.stdout.readline()))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        q = TelemetryQueue(path)
        assert q._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        have = {r.seq for r in q.pending(0)}
        acked = q.acked
        # every seq the writer saw committed is either acknowledged or still queued
        assert all(s <= acked or s in have for s in reported)
        assert len(reported) == len(set(reported))  # no seq handed out twice across crashes
        q.close()
