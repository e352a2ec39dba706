"""`edge-sdk telemetry export --from FILE.jsonl --mqtt URL | --otlp URL`: the ground's rows into fleet backends."""

from __future__ import annotations

import signal
import threading


def register_export(tsub) -> None:
    ex = tsub.add_parser("export", help="ground side: publish what `telemetry listen --out FILE` stored to MQTT or an OTLP/HTTP collector")
    ex.add_argument("--from", dest="source", required=True, metavar="FILE.jsonl", help="the file `telemetry listen --out` writes")
    ex.add_argument("--mqtt", metavar="URL", help="mqtt://host:port/prefix: one topic per device and record kind, QoS 1")
    ex.add_argument("--otlp", metavar="URL", help="http://collector:4318: samples as OTLP/HTTP metrics (POST URL/v1/metrics)")
    ex.add_argument("--seconds", type=float, help="stop after this many seconds (default: follow the file until interrupted)")
    ex.set_defaults(func=run_export)


def run_export(args) -> int:
    from edge_sdk.errors import ConfigError

    if bool(args.mqtt) == bool(args.otlp):
        raise ConfigError("give one destination", hint="pass --mqtt mqtt://host:port/prefix or --otlp http://collector:4318")
    if args.mqtt:
        from edge_sdk.runtime.telemetry.mqtt import MqttExporter

        exporter = MqttExporter(args.mqtt, args.source)
    else:
        from edge_sdk.runtime.telemetry.export import OtlpExporter

        exporter = OtlpExporter(args.otlp, args.source)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.seconds is not None:
        threading.Timer(args.seconds, stop.set).start()
    exporter.run(stop)
    print(f"exported {exporter.exported} rows; offset {exporter.offset()} of {args.source}")
    return 0
