"""`edge-sdk device update SOURCE | rollback | status | health | boot-check`: the bundle slots (docs/fleet.md).

Settings come from the daemon's config (bundle = the slot link, bundle_key, server host/port/api
key, emulate); options override them. Environment variables are read here and nowhere below.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from pathlib import Path

from edge_sdk.errors import ConfigError, PlatformError

from ._common import int_at_least, number_in

DEVICE_CONFIG = "/etc/edge-sdk/edge-sdk.toml"
RESTART = "systemctl restart edge-sdk"
log = logging.getLogger("edge_sdk.fleet")


def register_slots(dsub) -> None:
    u = dsub.add_parser("update", help="fetch, verify and activate a bundle (directory, tarball or http(s) URL) in the free slot")
    u.add_argument("source", metavar="SOURCE", help="bundle directory, .tar/.tar.gz, or http(s) URL of either")
    _common(u)
    u.set_defaults(func=run_update)
    r = dsub.add_parser("rollback", help="serve the other slot again (verified, restarted and checked first)")
    _common(r)
    r.set_defaults(func=run_rollback)
    s = dsub.add_parser("status", help="both slots: version, hash, signer, health, verification")
    _common(s)
    s.set_defaults(func=run_status)
    h = dsub.add_parser("health", help="check the daemon (/health and a generation); passing commits a slot on trial")
    _common(h)
    h.add_argument("--if-trial", action="store_true", help="check only while a slot is on trial (systemd ExecStartPost)")
    h.set_defaults(func=run_health)
    b = dsub.add_parser("boot-check", help="before each daemon start (systemd ExecStartPre): count a trial start, give it up past --max-boots")
    _common(b)
    b.add_argument("--max-boots", type=int_at_least(1), default=3, help="starts a new slot gets before the previous one serves again (default 3)")
    b.add_argument("--give-up", action="store_true", help="switch back from a slot on trial now; exit 1 when none is (OnFailure= unit)")
    b.set_defaults(func=run_boot_check)


def _common(p) -> None:
    p.add_argument("--config", default=os.environ.get("EDGE_SDK_CONFIG") or DEVICE_CONFIG,
                   help=f"daemon config (default {DEVICE_CONFIG}; env EDGE_SDK_CONFIG)")
    p.add_argument("--slots", metavar="DIR", help="slot directory (default: the folder of the config's bundle link, <state>/slots)")
    p.add_argument("--key", metavar="PUB", help="trusted ed25519 public key (default: bundle_key in the config)")
    p.add_argument("--emulate", metavar="BOARD", default=os.environ.get("EDGE_SDK_EMULATE"), help="board the device is (default: the config's, else detected)")
    p.add_argument("--restart-command", default=RESTART, help=f"how the daemon is restarted after a switch (default: {RESTART})")
    p.add_argument("--no-restart", action="store_true", help="switch slots only (staging an image: no daemon to restart or check)")
    p.add_argument("--health-timeout", type=number_in(0, low_open=True), default=300.0, help="seconds the restarted daemon has to become healthy (default 300)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _config(args):
    from edge_sdk.runtime.server.config import ServeConfig, load_config

    return load_config(args.config) if Path(args.config).exists() or args.config != DEVICE_CONFIG else ServeConfig()


def _slots(args, config):
    from edge_sdk.runtime.fleet.slots import LINK, SlotStore

    if args.slots:
        return SlotStore(args.slots)
    if config.bundle and Path(config.bundle).name == LINK:
        return SlotStore(Path(config.bundle).parent)
    raise ConfigError(f"the config's bundle {config.bundle or '(none)'} is not a slot link (.../slots/{LINK})",
                      hint='set bundle = "/var/lib/edge-sdk/slots/current" in the config, or pass --slots DIR')


def _key(args, config, required: bool = True) -> Path | None:
    key = args.key or config.bundle_key
    if not key and required:
        raise ConfigError("an update needs the device's trusted key", hint="set bundle_key in the config or pass --key PUB")
    return Path(key) if key else None


def _board(args, config) -> str | None:
    if args.emulate or config.emulate:
        return args.emulate or config.emulate
    try:
        from edge_sdk.runtime.platform import Platform

        return Platform.from_options(root=config.root or None).board().name
    except (ImportError, PlatformError) as exc:
        log.warning("board not detected (%s): bundles are not checked against it", exc)
        return None


def _health(args, config):
    from edge_sdk.runtime.fleet.health import HealthCheck

    host = config.server.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    host = f"[{host}]" if ":" in host else host
    return HealthCheck(f"http://{host}:{config.server.port}", api_key=config.api_key(), timeout_s=args.health_timeout)


def _restart(args):
    cmd = shlex.split(args.restart_command)

    def restart() -> None:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PlatformError(f"{cmd[0]} failed: {exc}", hint="pass --restart-command, or restart the daemon by hand") from None
        if done.returncode != 0:
            raise PlatformError(f"{args.restart_command} exited {done.returncode}: {done.stderr.strip()[:200]}",
                                hint="pass --restart-command, or restart the daemon by hand")

    return (lambda: None) if args.no_restart else restart


def _reporter(config):
    """Update outcomes as telemetry events, queued where the uplink sends from (when one is configured)."""
    if not config.telemetry.port_url:
        return lambda kind, **fields: None
    from edge_sdk.runtime.telemetry.collector import Telemetry
    from edge_sdk.runtime.telemetry.queue import TelemetryQueue
    from edge_sdk.runtime.telemetry.uplink import state_dir

    def report(kind: str, **fields) -> None:
        queue = TelemetryQueue(state_dir(config.telemetry.state_dir or None) / "telemetry.sqlite")
        try:
            Telemetry(queue).event(kind, **fields)
        finally:
            queue.close()

    return report


def _device(args, key_required: bool = True):
    from edge_sdk.runtime.fleet.update import Device, check_config_bundle

    config = _config(args)
    slots = _slots(args, config)
    if not args.no_restart and not args.slots:
        check_config_bundle(config.bundle, slots)
    return Device(slots, _key(args, config, key_required), restart=_restart(args),
                  health=None if args.no_restart else _health(args, config), board=_board(args, config), report=_reporter(config))


def _print(args, result: dict, line: str) -> int:
    if args.json:
        from ._common import print_json

        print_json(result)
    else:
        print(line)
    return 0


def run_update(args) -> int:
    from edge_sdk.runtime.fleet.update import update

    r = update(args.source, _device(args))
    line = f"{r['result']}: slot {r['slot']} serves {r['version']} ({r['hash'][:12]}, signed {r['signer']})"
    return _print(args, r, line)


def run_rollback(args) -> int:
    from edge_sdk.runtime.fleet.update import rollback

    r = rollback(_device(args))
    return _print(args, r, f"rolled back: slot {r['slot']} serves {r['version']} ({r['hash'][:12]})")


def run_status(args) -> int:
    from edge_sdk.runtime.fleet.update import status

    config = _config(args)
    slots = _slots(args, config)
    st = status(slots, _key(args, config, required=False))
    lines = []
    for name, s in st["slots"].items():
        mark = "*" if s["active"] else " "
        lines.append(f"{mark} {name}  {s.get('version', '-'):<12} {s.get('hash', '-')[:12]:<12} {s.get('signer', '-'):<26} "
                     f"health={s.get('health', '-'):<8} {s['verified']}")
    if st["trial"]:
        lines.append(f"trial: slot {st['trial']['slot']}, start {st['trial']['boots']}")
    return _print(args, st, "\n".join(lines))


def run_health(args) -> int:
    from edge_sdk.runtime.fleet.health import run_check

    config = _config(args)
    slots = _slots(args, config)
    trial = slots.state()["trial"]
    if args.if_trial and not trial:
        return 0
    r = run_check(_health(args, config))
    if trial and slots.active() == trial["slot"]:
        slots.commit(trial["slot"])
        r["committed"] = trial["slot"]
    return _print(args, r, f"healthy: {r['model']}" + (f"; slot {r['committed']} committed" if "committed" in r else ""))


def run_boot_check(args) -> int:
    config = _config(args)
    if not config.bundle or Path(config.bundle).name != "current":
        if not args.slots:
            return 0  # the daemon serves a bundle outside the slots: nothing to count
    slots = _slots(args, config)
    if args.give_up:
        if not slots.state()["trial"]:
            print("no slot on trial: nothing to give up")
            return 1
        now = slots.roll_back("the daemon failed to start repeatedly (systemd OnFailure)")
        return _print(args, {"result": "rolled back", "slot": now}, f"rolled back: slot {now} serves")
    msg = slots.boot_check(args.max_boots)
    return _print(args, {"result": msg}, msg)
