"""Telemetry over a real mosquitto broker: direct uplink, ground exporter, birth/death, commands, broker restart."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.runtime.telemetry import wire
from edge_sdk.runtime.telemetry.collector import Telemetry
from edge_sdk.runtime.telemetry.commands import COMMANDS, CommandHandler, Status, decode_result, encode_command
from edge_sdk.runtime.telemetry.queue import TelemetryQueue
from mqtt_broker import Broker, Subscriber

KEY = bytes(range(32))


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.stop()


def _device(tmp_path, broker, on_command=None, name="dev"):
    from edge_sdk.runtime.telemetry.mqtt import MqttSender

    q = TelemetryQueue(tmp_path / f"{name}.sqlite")
    tel = Telemetry(q)
    events = []
    sender = MqttSender(f"{broker.url}/fleet", KEY, q, on_command=on_command, report=lambda k, **f: events.append((k, f)))
    stop = threading.Event()
    t = threading.Thread(target=sender.run, args=(stop,), daemon=True)
    t.start()
    return q, tel, sender, stop, t, events


def _wait(cond, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_direct_uplink_loses_nothing_across_a_broker_restart(tmp_path, broker):
    sub = Subscriber(broker.url, "fleet/#")
    q, tel, sender, stop, t, _ = _device(tmp_path, broker)
    try:
        assert _wait(sender.conn.connected.is_set)
        seqs = [tel.event("step", i=i) for i in range(100)]
        assert _wait(lambda: q.acked >= seqs[-1])
        broker.stop()
        seqs += [tel.event("step", i=i) for i in range(100, 200)]  # queued while the broker is away
        assert q.acked < seqs[-1]
        broker.start()
        assert _wait(lambda: q.acked >= seqs[-1], 60)
        assert sub.wait_for(q.acked, 60)
    finally:
        stop.set()
        t.join(10)
        sub.close()
    device = f"{q.stream_id:08x}"
    got = {seq: row for (stream, seq), row in sub.rows.items() if stream == device and row["kind"] == "event"}
    assert sorted(got) == seqs  # 0 lost, none extra
    assert [got[s]["data"]["i"] for s in seqs] == list(range(200))
    assert all(row["data"]["event"] == "step" for row in got.values())
    assert sub.deliveries - len(sub.rows) >= 0  # QoS 1 redeliveries are possible; rows are kept once per (stream, seq)


def test_birth_then_last_will_when_the_device_dies(tmp_path, broker):
    script = f"""
import sys, threading
sys.path.insert(0, {str(tmp_path)!r})
from edge_sdk.runtime.telemetry.mqtt import MqttSender
from edge_sdk.runtime.telemetry.queue import TelemetryQueue
q = TelemetryQueue({str(tmp_path / 'd.sqlite')!r})
print(f"{{q.stream_id:08x}}", flush=True)
MqttSender({broker.url + '/fleet'!r}, bytes(range(32)), q).run(threading.Event())
"""
    status = {}
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watch")
    c.on_connect = lambda cl, *a: cl.subscribe("fleet/+/status", qos=1)
    c.on_message = lambda cl, u, m: status.setdefault(m.topic, []).append(m.payload.decode())
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        topic = f"fleet/{proc.stdout.readline().strip()}/status"
        assert _wait(lambda: status.get(topic, [])[-1:] == ["online"])
        proc.kill()
        assert _wait(lambda: status.get(topic, [])[-1:] == ["offline"])  # the broker's last will
    finally:
        proc.kill()
        c.loop_stop()


def test_commands_over_mqtt_are_authenticated_and_replay_protected(tmp_path, broker):
    from edge_sdk.runtime.telemetry.mqtt import MqttCommander

    holder = {}
    handler = lambda frame: holder["h"](frame)  # noqa: E731
    q, tel, sender, stop, t, events = _device(tmp_path, broker, on_command=handler)
    holder["h"] = CommandHandler(q, {"set-interval": tel.set_interval})
    ground = MqttCommander(f"{broker.url}/fleet", KEY)
    try:
        assert _wait(sender.conn.connected.is_set)
        frame = wire.Frame(wire.FrameType.COMMAND, q.stream_id, 10, 0, encode_command("set-interval", (2.5,)))
        assert decode_result(10, ground.send(frame, timeout_s=60)).status == Status.OK and tel.interval == 2.5
        old = wire.Frame(wire.FrameType.COMMAND, q.stream_id, 9, 0, encode_command("set-interval", (9.0,)))
        assert decode_result(9, ground.send(old, timeout_s=60)).status == Status.REPLAY and tel.interval == 2.5
        forged = wire.encode(wire.Frame(wire.FrameType.COMMAND, q.stream_id, 11, 0, encode_command("set-interval", (7.0,))), b"x" * 32)
        with pytest.raises(Exception, match="no result"):
            ground.send(wire.Frame(wire.FrameType.COMMAND, q.stream_id, 11, 0), timeout_s=2, raw=forged)
        # no answer is due; the device may see the forged frame after the ground gave up (reported after counted)
        assert _wait(lambda: [k for k, _ in events].count("command_rejected") == 2, 60)
        assert tel.interval == 2.5 and sender.rejected_commands == 1
        kinds = [k for k, _ in events]
        assert kinds.count("command_rejected") == 2 and "MAC does not verify" in events[-1][1]["reason"]
    finally:
        stop.set()
        t.join(10)
        ground.close()


def test_exporter_publishes_what_listen_stored_across_a_broker_restart(tmp_path, broker):
    from edge_sdk.runtime.telemetry.mqtt import MqttExporter

    store = tmp_path / "ground.jsonl"
    rows = [{"stream": f"{d:08x}", "seq": s, "time_ms": s, "kind": "sample", "priority": 0, "data": {"x": s}}
            for d in (1, 2) for s in range(1, 151)]
    store.write_text("".join(json.dumps(r) + "\n" for r in rows[:150]))
    sub = Subscriber(broker.url, "ground/#")
    exporter = MqttExporter(f"{broker.url}/ground", store, batch=50)
    stop = threading.Event()
    t = threading.Thread(target=exporter.run, args=(stop,), daemon=True)
    t.start()
    try:
        assert sub.wait_for(150, 60)
        broker.stop()
        with open(store, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows[150:]))
            f.write('{"stream": "00000002", "seq": 9')  # a row still being written is not exported
        broker.start()
        assert sub.wait_for(300, 60)
    finally:
        stop.set()
        t.join(10)
        sub.close()
    assert sorted(sub.rows) == sorted((r["stream"], r["seq"]) for r in rows)
    assert exporter.offset() == store.stat().st_size - len('{"stream": "00000002", "seq": 9')


def test_a_publish_racing_a_dropped_connection_fails_the_batch_instead_of_the_thread(tmp_path):
    pytest.importorskip("paho.mqtt.client")
    from edge_sdk.runtime.telemetry.mqtt import Connection, parse_url

    conn = Connection(parse_url("mqtt://127.0.0.1:9/x"), "race")
    conn.connected.set()  # on_connect seen, socket already gone
    assert conn.publish_all([("x/d/event", b"{}", False)], timeout_s=1) is False


def test_records_the_broker_acknowledged_reach_a_persistent_consumer_across_a_restart(tmp_path, broker):
    """The device forgets a record at PUBACK; from then on the broker holds it, for a consumer that is
    away, across its own restart (its persistence file must be writable), and for records published
    after the restart before the consumer is back."""
    sub = Subscriber(broker.url, "fleet/+/event", client_id="consumer-restart")
    q, tel, sender, stop, t, _ = _device(tmp_path, broker)
    try:
        assert _wait(sender.conn.connected.is_set)
        seqs = [tel.event("step", i=i) for i in range(10)]
        assert sub.wait_for(10, 60)
        sub.close()  # away, its session (subscription, queued messages) kept by the broker
        first = set(sub.rows)
        seqs += [tel.event("step", i=i) for i in range(10, 20)]
        assert _wait(lambda: q.acked >= seqs[-1])  # acknowledged: queued by the broker for the consumer
        broker.stop()
        broker.start()
        seqs += [tel.event("step", i=i) for i in range(20, 30)]
        assert _wait(lambda: q.acked >= seqs[-1], 60)  # published into the restored session
        sub = Subscriber(broker.url, "fleet/+/event", client_id="consumer-restart")
        assert sub.wait_for(20, 60)  # the 10 queued while it was away and the 10 after the restart
    finally:
        stop.set()
        t.join(10)
        sub.close()
    device = f"{q.stream_id:08x}"
    assert sorted(seq for stream, seq in first | set(sub.rows) if stream == device) == seqs  # 0 lost, none extra


def test_rows_decode_with_the_queues_schema_table_after_a_reopen(tmp_path):
    from edge_sdk.runtime.telemetry.mqtt import record_row

    q = TelemetryQueue(tmp_path / "q.sqlite")
    Telemetry(q).event("boot", version="1.2")
    q.add([({"a": 1, "b": 2.5}, 2, 0, 7)])
    q.close()
    q = TelemetryQueue(tmp_path / "q.sqlite")
    table = q.schemas()
    assert sorted(table.values()) == sorted([("event", "version"), ("a", "b")])
    rows = [record_row(q.stream_id, r, table) for r in q.pending(0)]
    schema_rows = {r["schema"]: tuple(r["fields"]) for r in rows if r["kind"] == "schema"}
    assert schema_rows == table  # the table is what the schema records announce
    assert [r["data"] for r in rows if r["kind"] != "schema"] == [{"event": "boot", "version": "1.2"}, {"a": 1, "b": 2.5}]
    q.close()


def _signed(body: bytes) -> bytes:
    """Bytes as the broker would deliver them: a frame with a valid MAC and CRC around any header and payload."""
    import struct

    body += wire.mac(KEY, body)
    return wire.cobs_encode(body + struct.pack(">I", wire.crc32c(body)))


_HEADERS = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                     st.binary(min_size=6, max_size=6))
_PAYLOADS = (st.binary(max_size=200)
             | st.tuples(_HEADERS, st.binary(max_size=120)).map(lambda t: _signed(wire.HEADER.pack(*t[0]) + t[1]))
             | st.tuples(st.sampled_from([code for code, _ in COMMANDS.values()] + [0, 99]), st.binary(max_size=40),
                         st.integers(1, 2**32 - 1)).map(lambda t: (bytes([t[0]]) + t[1], t[2])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(_PAYLOADS, min_size=1, max_size=4))
def test_any_command_or_result_payload_is_run_or_rejected_never_raised(tmp_path, payloads):
    """What a broker delivers (any bytes, signed frames with any header, signed COMMANDs with any arguments):
    the device runs or rejects it and the ground drops what is not a result, neither raises."""
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed (pip install 'edge-sdk[runtime]')")
    from edge_sdk.runtime.telemetry.mqtt import MqttCommander, MqttSender

    q = TelemetryQueue(tmp_path / f"fuzz-{time.monotonic_ns()}.sqlite")
    handler = CommandHandler(q, {"snapshot": lambda: None, "set-interval": lambda s: None, "set-power-mode": lambda m: None})
    sender = MqttSender("mqtt://127.0.0.1:1/fleet", KEY, q, on_command=handler, report=lambda k, **f: None)
    commander = object.__new__(MqttCommander)  # its message handler only: no connection is opened
    commander.key, commander._results, commander._cv = KEY, {}, threading.Condition()
    try:
        raw = []
        for p in payloads:
            if isinstance(p, tuple):  # (command payload, counter): a signed COMMAND for this device, any argument bytes
                p = wire.encode(wire.Frame(wire.FrameType.COMMAND, q.stream_id, p[1], 0, p[0]), KEY).strip(b"\x00")
            raw.append(p)
            sender._on_message("fleet/x/command", p)
            commander._on_message("fleet/x/result", p)
        sender._run_commands()
        valid = 0
        for p in raw:
            try:
                f = wire.decode(p, KEY)
                valid += f.type == wire.FrameType.COMMAND and f.stream == q.stream_id
            except wire.FrameError:
                pass
        assert sender.rejected_commands == len(raw) - valid
        assert handler.executed + handler.rejected <= valid
    finally:
        sender.conn.client.loop_stop()
        q.close()
