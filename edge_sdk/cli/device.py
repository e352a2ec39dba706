"""`edge-sdk device install|update SOURCE|rollback|status|health|boot-check`: set up the daemon, and
change the bundle it serves through A/B slots (docs/fleet.md)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("device", help="set up this device to run the daemon (edge-sdk device install)")
    dsub = p.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    i = dsub.add_parser("install", help="install the service user, state dir, config, systemd unit and udev rule (idempotent)")
    i.add_argument("--root", default="/", help="filesystem root to install into (default /; a directory to stage an image)")
    i.add_argument("--bundle", help="bundle path written into a newly created config")
    i.add_argument("--no-reload", action="store_true", help="do not run systemctl daemon-reload / udevadm reload on /")
    i.add_argument("--json", action="store_true", help="print the steps as JSON")
    i.set_defaults(func=run_install)
    from .fleet import register_slots

    register_slots(dsub)


def run_install(args) -> int:
    from dataclasses import asdict

    from edge_sdk.runtime.server.install import install

    steps = install(args.root, bundle=args.bundle, reload=not args.no_reload)
    if args.json:
        from ._common import print_json

        print_json([asdict(s) for s in steps])
    else:
        for s in steps:
            print(f"{s.result:<9} {s.what:<16} {s.path}")
        if args.root == "/":
            print("next: systemctl enable --now edge-sdk")
    return 0
