"""The link end to end on real ptys and real TCP sockets: delivery, noise, keys, budget, commands."""

import json
import threading
import time
from contextlib import contextmanager

import pytest

from edge_sdk.runtime.telemetry import commands, records, wire
from edge_sdk.runtime.telemetry.collector import Telemetry
from edge_sdk.runtime.telemetry.commands import CommandHandler, Status
from edge_sdk.runtime.telemetry.ground import GroundStation
from edge_sdk.runtime.telemetry.link import Sender
from edge_sdk.runtime.token_bucket import TokenBucket
from edge_sdk.runtime.telemetry.linesim import Noise, PtyLine, SocketLine
from edge_sdk.runtime.telemetry.queue import TelemetryQueue

KEY = bytes.fromhex("5a" * 32)
OTHER_KEY = bytes.fromhex("a5" * 32)
WAIT_S = 60  # bound on every wait for the link: generous for a loaded machine, still a failure


def readings(i=[0]):
    i[0] += 1
    return {"temp_mc": {"tj": 52562 + i[0], "gpu": 48437}, "rails": {"VDD_GPU_SOC": 2412.0, "VDD_CPU_CV": 1607.5},
            "gpu_mhz": 1300.5, "mode": "MODE_30W", "n": i[0]}


def fill(tmp_path, n, name="q.sqlite", **kw):
    q = TelemetryQueue(tmp_path / name, **kw)
    tel = Telemetry(q, readings, interval=1)
    for _ in range(n):
        tel.sample()
    tel.event("thermal_step", tj_c=95.5)
    return q, tel


def expected_rows(q):
    """What the ground must write: the queue's records decoded, by seq (taken before sending)."""
    schemas, rows = {}, {}
    for r in q.pending(0, 100000):
        if r.kind == records.SCHEMA_KIND:
            records.apply_schema(schemas, r.body)
        else:
            rows[r.seq] = records.decode_record(r.body, schemas)
    return rows


def read_out(path):
    return [json.loads(line) for line in open(path)]


@contextmanager
def running(*loops):
    stop = threading.Event()
    threads = [threading.Thread(target=fn, args=(stop,), kwargs=kw, daemon=True) for fn, kw in loops]
    for t in threads:
        t.start()
    try:
        yield stop
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=WAIT_S)


def wait_for(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def check_exactly_once(q, out, want):
    rows = read_out(out)
    seqs = [r["seq"] for r in rows]
    assert len(seqs) == len(set(seqs)), "a record was written twice"
    got = {r["seq"]: r["data"] for r in rows if r["kind"] != "schema"}
    assert got == want


@pytest.mark.parametrize("line_cls", [PtyLine, SocketLine])
def test_every_record_arrives_once(tmp_path, line_cls):
    q, _ = fill(tmp_path, 150)
    want = expected_rows(q)
    with line_cls() as line:
        sender = Sender(line.a, KEY, q)
        ground = GroundStation(line.b, KEY, tmp_path / "out.jsonl")
        with running((sender.run, {}), (ground.run, {})):
            assert wait_for(lambda: q.acked == max(want), WAIT_S)
        ground.close()
    check_exactly_once(q, tmp_path / "out.jsonl", want)
    assert q.pending(0) == []
    assert read_out(tmp_path / "out.jsonl")[-1]["data"]["event"] == "thermal_step"


@pytest.mark.parametrize("line_cls", [PtyLine, SocketLine])
def test_noisy_line_loses_nothing_and_resyncs(tmp_path, line_cls):
    q, _ = fill(tmp_path, 150)
    want = expected_rows(q)
    up, down = Noise(flip_rate=1e-3, garbage_rate=1e-3, seed=1), Noise(flip_rate=1e-2, garbage_rate=5e-3, seed=2)
    with line_cls(up, down) as line:
        sender = Sender(line.a, KEY, q, rto=0.3)
        ground = GroundStation(line.b, KEY, tmp_path / "out.jsonl")
        with running((sender.run, {}), (ground.run, {})):
            assert wait_for(lambda: q.acked == max(want), WAIT_S)
        ground.close()
    check_exactly_once(q, tmp_path / "out.jsonl", want)
    assert up.flipped and up.injected and down.flipped and down.injected
    assert ground.stats.crc_errors > 0 and ground.stats.auth_failures == 0
    assert sum(s.gaps for s in ground.streams.values()) > 0 or sender.stats.timeouts > 0


def test_wrong_key_is_rejected_and_counted(tmp_path):
    q, _ = fill(tmp_path, 20)
    with PtyLine() as line:
        sender = Sender(line.a, KEY, q, rto=0.2)
        ground = GroundStation(line.b, OTHER_KEY, tmp_path / "out.jsonl")
        with running((sender.run, {}), (ground.run, {})):
            assert wait_for(lambda: ground.stats.auth_failures >= 3, WAIT_S)
        ground.close()
    assert ground.stats.frames == 0 and read_out(tmp_path / "out.jsonl") == []
    assert q.acked == 0 and len(q.pending(0, 1000)) == 23  # nothing forgotten on the device


def test_drops_travel_upstream(tmp_path):
    q, tel = fill(tmp_path, 100, max_bytes=4096)
    assert q.dropped > 0
    want = expected_rows(q)
    with PtyLine() as line:
        sender = Sender(line.a, KEY, q)
        ground = GroundStation(line.b, KEY, tmp_path / "out.jsonl")
        with running((sender.run, {}), (ground.run, {})):
            assert wait_for(lambda: q.acked == max(want), WAIT_S)
        ground.close()
    check_exactly_once(q, tmp_path / "out.jsonl", want)
    (state,) = ground.streams.values()
    assert state.device_dropped == q.dropped
    assert state.skipped == q.dropped  # the holes in the sequence are exactly the drops


def test_link_budget_holds(tmp_path):
    budget = 3000.0
    q, _ = fill(tmp_path, 400)
    with PtyLine() as line:
        sender = Sender(line.a, KEY, q, budget=budget)
        burst = sender.bucket.capacity
        # each write stamped with the clock reading its bytes were charged at: the windows below are then
        # exact whatever the scheduling (the line's own stamps lag a starved relay thread)
        now = [0.0]

        def clock():
            now[0] = time.monotonic()
            return now[0]

        takes = []
        t_start = time.monotonic()  # the bucket starts full, no earlier than this
        sender.bucket = TokenBucket(budget, burst, clock=clock)
        take = sender.bucket.take
        sender.bucket.take = lambda n: (take(n), takes.append((now[0], n)))
        ground = GroundStation(line.b, KEY, tmp_path / "out.jsonl")
        with running((sender.run, {}), (ground.run, {})):
            assert wait_for(lambda: sender.stats.bytes_sent > 3 * budget, WAIT_S)
        ground.close()
    log = line.log["ab"]
    assert q.pending(0, 1)  # still backlogged: the budget, not the data, set the pace
    for span in (0.5, 1.0, 2.0):
        t0 = takes[0][0]
        while t0 + span <= takes[-1][0]:
            # bytes written in any span: at most budget x span + one burst
            assert sum(n for t, n in takes if t0 <= t < t0 + span) <= budget * span + burst + 1e-6
            t0 += 0.05
    seen = 0
    for t, n in log:  # what reached the line by any time was written by then: the same bound from the start
        seen += n
        assert seen <= budget * (t - t_start) + burst + 1e-6
    assert sender.stats.bytes_sent == sum(n for _, n in log) == sum(n for _, n in takes)


def test_token_bucket_by_hand():
    t = [0.0]
    bucket = TokenBucket(1000, 500, clock=lambda: t[0])
    assert bucket.wait_time(500) == 0
    bucket.take(500)
    assert bucket.wait_time(200) == pytest.approx(0.2)
    t[0] = 10.0
    assert bucket.wait_time(500) == 0 and bucket.wait_time(501) == pytest.approx(0.001)  # capacity caps the burst


def device(tmp_path, url, key=KEY, interval=1.0):
    q = TelemetryQueue(tmp_path / "dev.sqlite")
    tel = Telemetry(q, readings, interval=interval)
    handler = CommandHandler(q, {"set-interval": tel.set_interval, "snapshot": lambda: tel.sample(priority=100)})
    return q, tel, handler, Sender(url, key, q, on_command=handler)


def test_commands_run_once_and_replays_are_rejected(tmp_path):
    with PtyLine() as line:
        q, tel, handler, sender = device(tmp_path, line.a)
        ground = GroundStation(line.b, KEY, tmp_path / "out.jsonl", counter_file=tmp_path / "counter")
        with running((sender.run, {}), (ground.run, {})):
            res = ground.send_command(q.stream_id, "set-interval", 2.5, timeout=WAIT_S)
            assert (res.status, tel.interval) == (Status.OK, 2.5)
            frame = ground.command_frame(q.stream_id, "set-interval", 7.0)
            assert frame.seq > res.counter  # the ground's counter moves forward
            assert ground.send_command(0, "", frame=frame, timeout=WAIT_S).status == Status.OK
            # the very same frame again: its stored result, not a second run
            again = ground.send_command(0, "", frame=frame, timeout=WAIT_S)
            assert again.status == Status.OK and handler.executed == 2
            # an older command captured off the line: rejected
            old = wire.Frame(wire.FrameType.COMMAND, q.stream_id, res.counter, 0, commands.encode_command("set-interval", (9.0,)))
            assert ground.send_command(0, "", frame=old, timeout=WAIT_S).status == Status.REPLAY
            assert tel.interval == 7.0 and handler.rejected == 1
            snap = ground.send_command(q.stream_id, "snapshot", timeout=WAIT_S)
            assert snap.status == Status.OK and isinstance(snap.value, int)
            bad = ground.send_command(q.stream_id, "set-interval", 0.0, timeout=WAIT_S)
            assert bad.status == Status.FAILED and "out of range" in bad.message
        ground.close()
        q.close()
        # after a restart of the device the counter still holds
        q, tel, handler, sender = device(tmp_path, line.a)
        ground = GroundStation(line.b, KEY, None)
        with running((sender.run, {}), (ground.run, {})):
            assert ground.send_command(0, "", frame=old, timeout=WAIT_S).status == Status.REPLAY
            assert handler.executed == 0
        ground.close()


def test_forged_command_is_ignored_and_counted(tmp_path):
    with PtyLine() as line:
        q, tel, handler, sender = device(tmp_path, line.a)
        forger = GroundStation(line.b, OTHER_KEY, None)
        with running((sender.run, {}), (forger.run, {})):
            for _ in range(2):  # each call writes at least one forged frame
                with pytest.raises(Exception, match="no result"):
                    forger.send_command(q.stream_id, "set-interval", 0.5, timeout=1.5, retry=0.5)
            assert wait_for(lambda: sender.stats.auth_failures >= 2, WAIT_S)
        forger.close()
    assert sender.stats.auth_failures >= 2 and handler.executed == 0 and tel.interval == 1.0


def test_power_mode_command_on_an_emulated_board(tmp_path):
    from edge_sdk.runtime.platform import emulated_root
    from edge_sdk.runtime.telemetry.uplink import Uplink, UplinkSettings

    root = emulated_root("orin-nx-16gb", tmp_path / "root")
    with PtyLine() as line:
        settings = UplinkSettings(line.a, KEY, tmp_path / "state", interval=60)
        uplink = Uplink.from_options(settings, root=str(root)).start()
        ground = GroundStation(line.b, KEY, tmp_path / "out.jsonl")
        with running((ground.run, {})):
            stream = uplink.queue.stream_id
            res = ground.send_command(stream, "set-power-mode", "MODE_10W", timeout=WAIT_S)
            assert (res.status, res.value) == (Status.OK, "MODE_10W")
            refused = ground.send_command(stream, "set-power-mode", "MAXN", timeout=WAIT_S)
            assert refused.status == Status.FAILED and "reboot" in refused.message
            assert ground.send_command(stream, "snapshot", timeout=WAIT_S).status == Status.OK
            assert uplink.stop(flush_timeout=WAIT_S)
        ground.close()
    rows = read_out(tmp_path / "out.jsonl")
    (change,) = [r["data"] for r in rows if r["kind"] == "event"]
    assert (change["event"], change["old"], change["new"], change["reason"]) == ("power_mode", "MODE_15W", "MODE_10W", "downlink command")
    samples = [r["data"] for r in rows if r["kind"] == "sample"]
    assert samples[-1]["nvpmodel_mode"] == "MODE_10W" and "rails.VDD_IN.mw" in samples[-1]


def test_ground_restart_resumes_from_its_output_file(tmp_path):
    q, tel = fill(tmp_path, 60)
    want = expected_rows(q)
    out = tmp_path / "out.jsonl"
    with PtyLine() as line:
        sender = Sender(line.a, KEY, q, budget=4000)  # slow enough to stop the ground mid-stream
        with running((sender.run, {})):
            ground = GroundStation(line.b, KEY, out)
            with running((ground.run, {})):
                assert wait_for(lambda: q.acked > 0, WAIT_S)
            ground.close()
            with open(out, "a") as fh:
                fh.write('{"stream": "cut sho')  # a crash in the middle of a write
            later = {tel.sample() for _ in range(60)}  # the rest of the stream, sampled while no ground listens
            want.update({r.seq: records.decode_record(r.body, q.schemas()) for r in q.pending(0, 100000) if r.seq in later})
            first_ack = q.acked
            assert first_ack < max(want)
            ground = GroundStation(line.b, KEY, out)
            assert ground.streams[q.stream_id].ack >= first_ack  # its last ACK may still be on the line
            assert len(ground.streams[q.stream_id].schemas[1]) == 8
            with running((ground.run, {})):
                assert wait_for(lambda: q.acked == max(want), WAIT_S)
            ground.close()
    rows = read_out(out)  # every line parses: the cut line is gone
    seqs = [r["seq"] for r in rows]
    assert seqs == list(range(1, max(want) + 1))
    assert all(r["data"] == want[r["seq"]] for r in rows if r["seq"] in want)
