"""OTLP/HTTP export: a local receiver decodes the protobuf; an outage loses nothing."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

pytest.importorskip("opentelemetry.proto.collector.metrics.v1.metrics_service_pb2")
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest  # noqa: E402

from edge_sdk.runtime.telemetry.export import OtlpExporter  # noqa: E402


class Receiver(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.down:
            self.send_response(503)
            self.end_headers()
            return
        assert self.path == "/v1/metrics" and self.headers["Content-Type"] == "application/x-protobuf"
        req = ExportMetricsServiceRequest()
        req.ParseFromString(body)
        for rm in req.resource_metrics:
            attrs = {a.key: a.value.string_value for a in rm.resource.attributes}
            for m in rm.scope_metrics[0].metrics:
                for p in m.gauge.data_points:
                    v = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                    self.server.points.append((attrs["service.instance.id"], m.name, p.time_unix_nano, v))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def receiver():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    srv.points, srv.down = [], False
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_samples_become_gauges_per_device_and_an_outage_loses_nothing(tmp_path, receiver):
    store = tmp_path / "ground.jsonl"
    rows = [{"stream": f"{d:08x}", "seq": s, "time_ms": 1000 + s, "kind": "sample", "priority": 0,
             "data": {"rail_mw": 100 * s, "tj_c": 40.5, "mode": "MAXN", "up": True}} for d in (1, 2) for s in range(1, 21)]
    rows.insert(3, {"stream": "00000001", "seq": 99, "time_ms": 1, "kind": "event", "priority": 1, "data": {"event": "x"}})
    store.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    ex = OtlpExporter(f"http://127.0.0.1:{receiver.server_address[1]}", store, batch=8, timeout_s=60)  # a slow answer is not an outage
    receiver.down = True
    assert ex.step() == 0 and ex.offset() == 0  # the collector is away: nothing is skipped
    receiver.down = False
    while ex.step():
        pass
    with open(store, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[10:]))
    while ex.step():
        pass
    samples = [r for r in rows if r["kind"] == "sample"]
    got = sorted(p for p in receiver.points if p[1] == "edge_sdk.rail_mw")
    assert got == sorted((r["stream"], "edge_sdk.rail_mw", (1000 + r["seq"]) * 1_000_000, 100 * r["seq"]) for r in samples)
    seqs = sorted((p[0], p[3]) for p in receiver.points if p[1] == "edge_sdk.telemetry.seq")
    assert seqs == sorted((r["stream"], r["seq"]) for r in samples)  # every record once, with its device and seq
    assert {p[1] for p in receiver.points} == {"edge_sdk.rail_mw", "edge_sdk.tj_c", "edge_sdk.telemetry.seq"}
    assert ex.offset() == store.stat().st_size
