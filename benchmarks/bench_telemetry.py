"""Telemetry link efficiency and outage drain time on a budgeted line.

A pty does not enforce baud rates, so the sender's link budget stands in for the line: 115200 baud
at 8N1 carries 11,520 bytes/s. Samples come from the emulated board's platform layer.

1. Backlogged: a queue much larger than the run; payload bytes (record bodies) acknowledged per
   second over the steady part of the run, divided by the line's capacity.
2. Outage: the samples of a whole outage (default 10 minutes at --interval) are queued first, then
   the link comes up while the collector keeps sampling; the time until the ground has everything
   is measured, and compared with backlog / (delivered rate - production rate).

    python benchmarks/bench_telemetry.py [--budget 11520] [--interval 1] [--outage 600] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from edge_sdk.runtime.telemetry.collector import Telemetry, platform_readings
from edge_sdk.runtime.telemetry.ground import GroundStation
from edge_sdk.runtime.telemetry.link import Sender
from edge_sdk.runtime.telemetry.linesim import PtyLine
from edge_sdk.runtime.telemetry.queue import TelemetryQueue

KEY = os.urandom(32)


def body_sizes(q: TelemetryQueue) -> dict[int, int]:
    return {r.seq: len(r.body) for r in q.pending(0, 10 ** 7)}


def link_up(q: TelemetryQueue, budget: float, workdir: Path):
    line = PtyLine().__enter__()
    sender = Sender(line.a, KEY, q, budget=budget)
    ground = GroundStation(line.b, KEY, workdir / "out.jsonl")
    stop = threading.Event()
    threads = [threading.Thread(target=sender.run, args=(stop,), daemon=True),
               threading.Thread(target=ground.run, args=(stop,), daemon=True)]
    for t in threads:
        t.start()

    def down():
        stop.set()
        for t in threads:
            t.join(timeout=5)
        ground.close()
        line.close()

    return sender, line, down


def backlogged(readings, budget: float, seconds: float, workdir: Path) -> dict:
    q = TelemetryQueue(workdir / "backlog.sqlite", max_bytes=64 << 20)
    tel = Telemetry(q, readings)
    n = int(budget * seconds * 1.5 / 150) + 100  # more than the run can send
    for _ in range(n):
        tel.sample()
    sizes = body_sizes(q)
    delivered = lambda: sum(size for seq, size in sizes.items() if seq <= q.acked)  # noqa: E731
    sender, line, down = link_up(q, budget, workdir)
    time.sleep(min(2.0, seconds / 4))  # past the first window
    t0, p0, b0 = time.monotonic(), delivered(), sender.stats.bytes_sent
    time.sleep(seconds)
    t1, p1, b1 = time.monotonic(), delivered(), sender.stats.bytes_sent
    down()
    assert q.pending(0, 1), "the queue ran dry: the run was not backlogged"
    rate = (p1 - p0) / (t1 - t0)
    return {"budget_Bps": budget, "seconds": round(t1 - t0, 2), "payload_Bps": round(rate, 1),
            "efficiency": round(rate / budget, 4), "wire_Bps": round((b1 - b0) / (t1 - t0), 1),
            "record_body_bytes": round(sum(sizes.values()) / len(sizes), 1), "retransmits": sender.stats.retransmits}


def outage(readings, budget: float, interval: float, outage_s: float, workdir: Path) -> dict:
    q = TelemetryQueue(workdir / "outage.sqlite", max_bytes=64 << 20)
    tel = Telemetry(q, readings, interval=interval)
    for _ in range(int(outage_s / interval)):
        tel.sample()
    backlog = sum(body_sizes(q).values())
    production = backlog / outage_s  # payload B/s the collector produces at this interval
    stop_sampling = threading.Event()
    sampler = threading.Thread(target=tel.run, args=(stop_sampling,), daemon=True)
    t0 = time.monotonic()
    sampler.start()
    sender, line, down = link_up(q, budget, workdir)
    while True:  # drained: the ground holds everything sampled up to a moment ago
        time.sleep(0.05)
        last = q.stats()["last_seq"]
        if q.acked >= last - 2:
            break
    drain = time.monotonic() - t0
    stop_sampling.set()
    sampler.join(timeout=5)
    down()
    return {"interval_s": interval, "outage_s": outage_s, "backlog_bytes": backlog,
            "production_Bps": round(production, 1), "drain_s_measured": round(drain, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=11520.0, help="link budget B/s (115200 baud 8N1: 11520)")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of the backlogged measurement")
    ap.add_argument("--interval", type=float, default=1.0, help="sample interval during the outage run")
    ap.add_argument("--outage", type=float, default=600.0, help="outage length in seconds")
    ap.add_argument("--board", default="agx-orin-64gb")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    readings = platform_readings(args.board)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {"load_before": os.getloadavg()[0]}
        result["backlogged"] = backlogged(readings, args.budget, args.seconds, work)
        o = outage(readings, args.budget, args.interval, args.outage, work)
        delivered = result["backlogged"]["payload_Bps"]
        o["drain_s_computed"] = round(o["backlog_bytes"] / (delivered - o["production_Bps"]), 2)
        result["outage"] = o
        result["load_after"] = os.getloadavg()[0]
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        b = result["backlogged"]
        print(f"backlogged at {b['budget_Bps']:.0f} B/s: {b['payload_Bps']:.0f} payload B/s = {b['efficiency']:.1%} "
              f"of capacity (wire {b['wire_Bps']:.0f} B/s, records of {b['record_body_bytes']:.0f} B, {b['retransmits']} retransmits)")
        print(f"{o['outage_s']:.0f} s outage at {o['interval_s']} s interval: backlog {o['backlog_bytes']} B, "
              f"production {o['production_Bps']:.0f} B/s, drained in {o['drain_s_measured']:.1f} s measured "
              f"({o['drain_s_computed']:.1f} s computed)")
        print(f"load average {result['load_before']:.2f} before, {result['load_after']:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
