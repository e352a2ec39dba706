"""Fleet simulation: N emulated devices (threads, distinct queues, ids and keys) uplink over loopback to
one mosquitto; one ground consumer keeps one row per (device, seq). Midway the broker is restarted.

Prints records/s ingested and, per device, records lost and duplicated (kept rows) plus the raw QoS 1
redeliveries. Every loop is bounded in count and time; loopback only.

    .venv/bin/python benchmarks/bench_fleet.py [--devices 50] [--records 200] [--timeout 300]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mqtt_broker import Broker  # noqa: E402 (the tests' mosquitto: one place starts it)


class Ground:
    def __init__(self, port: int, out: Path):
        import paho.mqtt.client as mqtt

        self.rows: dict[tuple[str, int], int] = {}
        self.deliveries = 0
        self.lock = threading.Lock()
        self.out = open(out, "w")
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-ground", clean_session=False)
        self.c.reconnect_delay_set(1, 2)
        self.c.on_connect = lambda c, *a: c.subscribe("fleet/+/event", qos=1)
        self.c.on_message = self.on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def on_message(self, c, u, msg):
        row = json.loads(msg.payload)
        key = (row["stream"], row["seq"])
        with self.lock:
            self.deliveries += 1
            self.rows[key] = self.rows.get(key, 0) + 1
            if self.rows[key] == 1:
                self.out.write(msg.payload.decode() + "\n")

    def unique(self) -> int:
        with self.lock:
            return len(self.rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--records", type=int, default=200, help="events per device")
    ap.add_argument("--timeout", type=float, default=300.0)
    a = ap.parse_args()
    from edge_sdk.runtime.telemetry.collector import Telemetry
    from edge_sdk.runtime.telemetry.mqtt import MqttSender
    from edge_sdk.runtime.telemetry.queue import TelemetryQueue

    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    broker = Broker(work, "max_inflight_messages 0\n")
    broker.start()
    ground = Ground(broker.port, work / "ground.jsonl")
    devices, stop = [], threading.Event()
    for i in range(a.devices):
        q = TelemetryQueue(work / f"dev{i}.sqlite")
        s = MqttSender(f"mqtt://127.0.0.1:{broker.port}/fleet", secrets.token_bytes(32), q)
        t = threading.Thread(target=s.run, args=(stop,), daemon=True)
        t.start()
        devices.append({"q": q, "tel": Telemetry(q), "sender": s, "thread": t, "seqs": []})
    t0 = time.monotonic()
    deadline = t0 + a.timeout
    half = a.records // 2
    for r in range(a.records):
        if r == half:
            broker.stop()  # mid-run outage: devices keep recording into their queues
            time.sleep(1.0)
            broker.start()
        for d in devices:
            d["seqs"].append(d["tel"].event("step", i=r))
        if time.monotonic() > deadline:
            break
    produced = time.monotonic()
    expected = sum(len(d["seqs"]) for d in devices)
    while ground.unique() < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    stop.set()
    for d in devices:
        d["thread"].join(10)
    lost, dup, redelivered = [], [], []
    for d in devices:
        name = f"{d['q'].stream_id:08x}"
        got = {seq: n for (stream, seq), n in ground.rows.items() if stream == name}
        lost.append(len(set(d["seqs"]) - set(got)))
        dup.append(len(set(got) - set(d["seqs"])))  # rows kept (one per (device, seq)) the device never recorded
        redelivered.append(sum(n - 1 for n in got.values()))  # QoS 1 copies dropped by the dedup
    print(json.dumps({"devices": a.devices, "records": expected, "ingested": ground.unique(), "seconds": round(elapsed, 2),
                      "produce_s": round(produced - t0, 2), "records_per_s": round(ground.unique() / elapsed, 1),
                      "lost": sum(lost), "duplicated_rows": sum(dup), "qos1_redeliveries": sum(redelivered),
                      "per_device": {"lost": lost, "duplicated": dup, "redelivered": redelivered}, "broker_restarts": 1}))
    broker.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0 if sum(lost) == 0 and sum(dup) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
