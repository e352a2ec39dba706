"""`edge-sdk power status|set MODE|policy NAME`: read and switch nvpmodel power modes, run a policy."""

from __future__ import annotations

import time

from ._common import print_json
from .main import add_device_options


def register(sub) -> None:
    p = sub.add_parser("power", help="read and switch nvpmodel power modes, run power policies")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    s = verbs.add_parser("status", help="current mode, all modes, rail power and tj")
    add_device_options(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=status)
    m = verbs.add_parser("set", help="switch to a mode (id or name) through nvpmodel -m")
    m.add_argument("mode")
    m.add_argument("--allow-reboot", action="store_true", help="accept a switch that needs a reboot (the device restarts)")
    add_device_options(m)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=set_mode)
    q = verbs.add_parser("policy", help="run a policy: performance, efficiency, power-cap, thermal-guard")
    q.add_argument("name", choices=["performance", "efficiency", "power-cap", "thermal-guard"])
    q.add_argument("--watts", type=float, help="power-cap: the cap in W")
    q.add_argument("--interval", type=float, default=2.0, help="seconds between policy ticks")
    q.add_argument("--seconds", type=float, default=None, help="stop after this long (default: run until Ctrl-C)")
    q.add_argument("--allow-reboot", action="store_true", help="let the policy use modes that need a reboot")
    add_device_options(q)
    q.add_argument("--json", action="store_true", help="one JSON line per mode change")
    q.set_defaults(func=policy)


def _manager(args):
    from ..runtime.platform import Platform, PowerManager

    return PowerManager(Platform.from_options(emulate=args.emulate, root=args.root))


def status(args) -> int:
    pm = _manager(args)
    cur = pm.current()
    snap = pm.platform.snapshot()
    total = snap.total_power_mw(pm.platform.total_rails())
    info = {"current": cur.__dict__, "modes": [m.__dict__ | {"needs_reboot": pm.needs_reboot(m, cur)} for m in pm.modes()],
            "power_mw": total, "rails_mw": {k: r.mw for k, r in snap.rails.items()}, "tj_c": snap.temp_c("tj")}
    if args.json:
        print_json(info)
        return 0
    print(f"power mode: {cur.name} (id {cur.id}, budget {cur.budget_w:g} W)")
    for m in info["modes"]:
        mark = "*" if m["id"] == cur.id else " "
        print(f" {mark} {m['id']} {m['name']:<12} {m['budget_w']:>5g} W  cores {m['cores_online']:>2}"
              f"{'  (reboot)' if m['needs_reboot'] else ''}")
    if total is not None:
        print(f"power: {total / 1000:.2f} W  " + "  ".join(f"{k} {v} mW" for k, v in info["rails_mw"].items()))
    if info["tj_c"] is not None:
        print(f"tj: {info['tj_c']:.1f} C")
    return 0


def set_mode(args) -> int:
    from ..runtime.platform.power import RebootRequiredError

    pm = _manager(args)
    try:
        change = pm.set(args.mode, allow_reboot=args.allow_reboot, reason="edge-sdk power set")
    except RebootRequiredError as exc:
        raise RebootRequiredError(exc.old, exc.new, how="add --allow-reboot") from None
    if args.json:
        print_json(change.to_dict() if change else {"unchanged": pm.current().name})
    else:
        print(f"power mode {change.old} -> {change.new}{' (after reboot)' if change.reboot else ''}" if change
              else f"already in {pm.current().name}")
    return 0


def policy(args) -> int:
    from ..runtime.platform.policies import make_policy

    pm = _manager(args)
    pol = make_policy(args.name, watts=args.watts)
    t0 = time.monotonic()
    while True:
        change = pm.run_policy(pol, pm.platform.snapshot(), allow_reboot=args.allow_reboot)
        if change:
            print_json(change.to_dict()) if args.json else print(f"{change.old} -> {change.new}: {change.reason}", flush=True)
        if args.seconds is not None and time.monotonic() - t0 >= args.seconds:
            return 0
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
