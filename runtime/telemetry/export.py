"""Ground export as OpenTelemetry metrics over OTLP/HTTP (protobuf), from what `telemetry listen` stored.

Each numeric field of a sample row becomes a gauge point ``edge_sdk.<field>`` stamped with the
record's own time; the device is the resource (``service.instance.id`` = the stream id), and
``edge_sdk.telemetry.seq`` carries the record's sequence number, so a collector sees which records
arrived. The offset of the last row the collector accepted (HTTP 2xx) is kept beside the file: an
outage leaves the rest to send afterwards, and a resent batch carries the same timestamps (a point
stored twice is the same point).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

from edge_sdk.errors import ConfigError, require

from .cursor import ExportCursor

log = logging.getLogger(__name__)


def metrics_request(rows: list[dict]):
    """ExportMetricsServiceRequest for the sample rows (one ResourceMetrics per device)."""
    svc = require("opentelemetry.proto.collector.metrics.v1.metrics_service_pb2", "runtime")
    common = require("opentelemetry.proto.common.v1.common_pb2", "runtime")
    metrics_pb = require("opentelemetry.proto.metrics.v1.metrics_pb2", "runtime")
    req = svc.ExportMetricsServiceRequest()
    by_device: dict[str, dict[str, list]] = {}
    for row in rows:
        if row.get("kind") != "sample" or not isinstance(row.get("data"), dict):
            continue
        t = int(row["time_ms"]) * 1_000_000
        points = by_device.setdefault(str(row["stream"]), {})
        points.setdefault("edge_sdk.telemetry.seq", []).append((t, int(row["seq"])))
        for name, value in row["data"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                points.setdefault(f"edge_sdk.{name}", []).append((t, value))
    for device, metrics in by_device.items():
        rm = req.resource_metrics.add()
        for k, v in (("service.name", "edge-sdk"), ("service.instance.id", device)):
            rm.resource.attributes.append(common.KeyValue(key=k, value=common.AnyValue(string_value=v)))
        sm = rm.scope_metrics.add()
        sm.scope.name = "edge_sdk.telemetry"
        for name, pts in metrics.items():
            m = sm.metrics.add(name=name)
            for t, v in pts:
                p = m.gauge.data_points.add(time_unix_nano=t)
                if isinstance(v, int):
                    p.as_int = v
                else:
                    p.as_double = float(v)
    return req if by_device else None, metrics_pb


class OtlpExporter:
    def __init__(self, url: str, source: str | os.PathLike, *, batch: int = 256, timeout_s: float = 10.0):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{url!r} is not an OTLP/HTTP URL", hint="use http://collector:4318")
        self.endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1/metrics") else "/v1/metrics")
        self.source = Path(source)
        self.cursor = ExportCursor(self.source, "otlp-offset")
        self.batch, self.timeout_s = batch, timeout_s
        self.exported = 0

    def offset(self) -> int:
        return self.cursor.offset()

    def _post(self, body: bytes) -> bool:
        req = urllib.request.Request(self.endpoint, data=body, headers={"Content-Type": "application/x-protobuf"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 (http/https: checked)
                return 200 <= resp.status < 300
        except (urllib.error.URLError, OSError) as exc:
            log.warning("OTLP collector %s: %s (rows wait in %s)", self.endpoint, getattr(exc, "reason", exc), self.source)
            return False

    def step(self) -> int:
        offset, lines = self.cursor.complete_rows(self.batch)
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                log.warning("%s: a row that is not JSON: skipped", self.source)
        if not lines:
            return 0
        req, _ = metrics_request(rows)
        if req is not None and not self._post(req.SerializeToString()):
            return 0
        self.cursor.save(offset + sum(len(ln) for ln in lines))
        self.exported += len(rows)
        return len(rows)

    def run(self, stop: threading.Event, poll_s: float = 0.2) -> None:
        while not stop.is_set():
            if not self.step():
                stop.wait(poll_s)
