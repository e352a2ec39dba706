"""`edge-sdk telemetry listen|uplink|keygen|send-command|status`."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ._common import print_json


def register(sub) -> None:
    from .main import add_device_options

    p = sub.add_parser("telemetry", help="serial telemetry uplink (device) and ground receiver")
    tsub = p.add_subparsers(dest="telemetry_command", metavar="ACTION", required=True)

    k = tsub.add_parser("keygen", help="write a new pre-shared key file (hex, mode 0600)")
    k.add_argument("file")
    k.set_defaults(func=_keygen)

    li = tsub.add_parser("listen", help="ground side: verify, acknowledge, drop duplicates, write records")
    li.add_argument("port_url", metavar="PORT_URL", help="/dev/ttyUSB0, a pty, socket://HOST:PORT, loop://")
    li.add_argument("--key", required=True, metavar="FILE", help="pre-shared key file (edge-sdk telemetry keygen)")
    li.add_argument("--out", metavar="FILE.jsonl", help="append records here (and resume from it); default stdout")
    li.add_argument("--seconds", type=float, help="stop after this many seconds (default: until interrupted)")
    li.add_argument("--commands", metavar="DIR", help="send downlink commands other processes drop here (send-command --via DIR)")
    li.add_argument("--counter-file", metavar="FILE", help="where the ground keeps its command counter (default in the state dir)")
    li.add_argument("--json", action="store_true", help="print the final statistics as JSON")
    li.set_defaults(func=_listen)

    up = tsub.add_parser("uplink", help="device side: sample, queue and send telemetry; run downlink commands")
    up.add_argument("port_url", metavar="PORT_URL", help="/dev/ttyTHS0, /dev/ttyACM0, a pty, socket://HOST:PORT, mqtt://HOST:PORT/PREFIX")
    up.add_argument("--key", required=True, metavar="FILE")
    add_device_options(up)
    up.add_argument("--state-dir", metavar="DIR", help="queue location (env EDGE_SDK_STATE_DIR; default /var/lib/edge-sdk as root, XDG state dir otherwise)")
    up.add_argument("--interval", type=float, default=5.0, metavar="S", help="seconds between samples (default 5)")
    up.add_argument("--link-budget", type=float, metavar="BPS", help="bytes/s the device may write (115200 baud 8N1: 11520)")
    up.add_argument("--queue-bytes", type=int, default=16 << 20, help="queue bound in bytes (default 16 MiB)")
    up.add_argument("--flush-timeout", type=float, default=5.0, metavar="S", help="on SIGTERM/SIGINT, send the queue for up to S seconds")
    up.add_argument("--json", action="store_true", help="print the link statistics as JSON on exit")
    up.set_defaults(func=_uplink)

    sc = tsub.add_parser("send-command", help="send one downlink command and print its result")
    sc.add_argument("--port", dest="port_url", metavar="PORT_URL", help="open the ground port directly (it must be free)")
    sc.add_argument("--via", metavar="DIR", help="or hand the command to a running `listen --commands DIR`")
    sc.add_argument("--key", metavar="FILE", help="pre-shared key file (with --port)")
    sc.add_argument("--stream", metavar="HEX", help="device stream id (default: learn it from the device's traffic)")
    sc.add_argument("--counter-file", metavar="FILE", help="where the ground keeps its command counter (default in the state dir)")
    sc.add_argument("--timeout", type=float, default=15.0, metavar="S")
    sc.add_argument("--json", action="store_true")
    sc.add_argument("downlink", metavar="COMMAND", choices=["set-power-mode", "set-interval", "snapshot", "update"],
                    help="set-power-mode MODE | set-interval SECONDS | snapshot | update URL")
    sc.add_argument("args", nargs="*")
    sc.set_defaults(func=_send_command)

    st = tsub.add_parser("status", help="the device queue: records waiting, acknowledged, dropped")
    st.add_argument("--state-dir", metavar="DIR")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)

    from .telemetry_export import register_export

    register_export(tsub)


def _keygen(args) -> int:
    from edge_sdk.runtime.telemetry.uplink import generate_key

    print(f"wrote {generate_key(args.file)}")
    return 0


def _stop_on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def _listen(args) -> int:
    from edge_sdk.runtime.telemetry.ground import GroundStation
    from edge_sdk.runtime.telemetry.uplink import load_key

    stop = threading.Event()
    _stop_on_signals(stop)
    on_record = None if args.out else (lambda row: (sys.stdout.write(json.dumps(row) + "\n"), sys.stdout.flush()))
    ground = GroundStation(args.port_url, load_key(args.key), args.out, on_record=on_record,
                           counter_file=_counter_file(args.counter_file) if args.commands else None)
    if args.commands:
        from edge_sdk.runtime.telemetry.spool import CommandSpool

        threading.Thread(target=CommandSpool(args.commands).serve, args=(ground, stop), daemon=True).start()
    deadline = time.monotonic() + args.seconds if args.seconds else None
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            ground.poll()
    except BrokenPipeError:  # stdout closed by the reader (| head): stop like on SIGTERM
        sys.stdout = open(os.devnull, "w")
    finally:
        ground.close()
    summary = ground.summary()
    if args.json:
        print_json(summary)
    else:
        for sid, s in summary["streams"].items():
            print(f"stream {sid}: {s['records']} records, acknowledged up to {s['ack']}, {s['duplicates']} duplicates, "
                  f"{s['gaps']} gaps, device dropped {s['device_dropped']}", file=sys.stderr)
        f = summary["frames"]
        print(f"frames {f['frames']}, CRC errors {f['crc_errors']}, rejected by MAC {f['auth_failures']}, "
              f"port outages survived {f['reconnects']}", file=sys.stderr)
    return 0


def _counter_file(explicit: str | None) -> Path:
    from ._common import state_dir

    path = Path(explicit) if explicit else state_dir(None) / "ground-command-counter"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _uplink(args) -> int:
    from edge_sdk.runtime.telemetry.uplink import Uplink, UplinkSettings, load_key

    from ._common import state_dir

    settings = UplinkSettings(args.port_url, load_key(args.key), state_dir(args.state_dir), interval=args.interval,
                              link_budget=args.link_budget, queue_bytes=args.queue_bytes)
    stop = threading.Event()
    _stop_on_signals(stop)
    uplink = Uplink.from_options(settings, emulate=args.emulate, root=args.root).start()
    print(f"uplink on {args.port_url}: stream {uplink.queue.stream_id:08x}, queue {uplink.queue.path}", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    flushed = uplink.stop(args.flush_timeout)
    stats = {"flushed": flushed, "link": vars(uplink.sender.stats)}
    if args.json:
        print_json(stats)
    else:
        print(f"uplink stopped: {'all records acknowledged' if flushed else 'records left in the queue'}", file=sys.stderr)
    return 0


def _send_command(args) -> int:
    from edge_sdk.errors import TelemetryError
    from edge_sdk.runtime.telemetry.commands import parse_args
    from edge_sdk.runtime.telemetry.ground import GroundStation
    from edge_sdk.runtime.telemetry.uplink import load_key

    typed = parse_args(args.downlink, args.args)
    if args.via:
        from edge_sdk.runtime.telemetry.spool import CommandSpool

        out = CommandSpool(args.via).submit(args.downlink, args.args, args.stream, args.timeout)
        if args.json:
            print_json(out)
        else:
            print(f"{args.downlink}: {out['status']} {out.get('message', '')} {'' if out.get('value') is None else out['value']}")
        return 0 if out["status"] == "ok" else 1
    if not args.port_url or not args.key:
        raise TelemetryError("send-command needs --port PORT_URL and --key FILE, or --via DIR",
                             hint="see edge-sdk telemetry send-command -h")
    counter_file = _counter_file(args.counter_file)
    ground = GroundStation(args.port_url, load_key(args.key), ack_data=False, counter_file=counter_file)
    stop = threading.Event()
    poller = threading.Thread(target=ground.run, args=(stop,), daemon=True)
    poller.start()
    try:
        stream = int(args.stream, 16) if args.stream else None
        deadline = time.monotonic() + args.timeout
        while stream is None and time.monotonic() < deadline:
            stream = next(iter(ground.streams), None)
            time.sleep(0.05)
        if stream is None:
            raise TelemetryError("no device traffic seen to learn its stream id", hint="pass --stream HEX")
        result = ground.send_command(stream, args.downlink, *typed, timeout=max(1.0, deadline - time.monotonic()))
    finally:
        stop.set()
        poller.join(timeout=2)
        ground.close()
    if args.json:
        print_json(result.as_dict())
    else:
        print(f"{args.downlink}: {result.status.name.lower()} {result.message} {'' if result.value is None else result.value}")
    return 0 if result.status == 0 else 1


def _status(args) -> int:
    from edge_sdk.runtime.telemetry.queue import TelemetryQueue
    from ._common import state_dir

    path = state_dir(args.state_dir) / "telemetry.sqlite"
    if not path.exists():
        from edge_sdk.errors import TelemetryError
        raise TelemetryError(f"no telemetry queue at {path}", hint="pass --state-dir or run edge-sdk telemetry uplink first")
    queue = TelemetryQueue(path)
    stats = queue.stats()
    queue.close()
    if args.json:
        print_json(stats)
    else:
        for k, v in stats.items():
            print(f"{k}: {v}")
    return 0
