"""`edge-sdk doctor`: check board, JetPack, GPU software, memory, storage, power and thermals."""

from __future__ import annotations

import os

from ._common import print_json
from .main import add_device_options

_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check board, JetPack, providers, memory, storage, power (pass/warn/fail with fixes)")
    add_device_options(p)
    p.add_argument("--bundle-dir", default=os.environ.get("EDGE_SDK_BUNDLES", "."),
                   help="directory on the filesystem holding the bundles (storage is measured there); env EDGE_SDK_BUNDLES")
    p.add_argument("--storage-seconds", type=float, default=2.0, help="time bound of the storage measurement")
    p.add_argument("--no-storage", action="store_true", help="skip the storage measurement")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..runtime.platform import Platform
    from ..runtime.platform.doctor import DoctorOptions, run_checks

    platform = Platform.from_options(emulate=args.emulate, root=args.root)
    opts = DoctorOptions(bundle_dir=args.bundle_dir,
                         storage_seconds=args.storage_seconds, storage=not args.no_storage)
    checks = run_checks(platform, opts)
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        print_json({"root": str(platform.root), "ok": not failed, "checks": [c.to_dict() for c in checks]})
    else:
        for c in checks:
            print(f"{_MARK[c.status]}  {c.name:<16} {c.detail}")
            if c.fix and c.status != "pass":
                print(f"      fix: {c.fix}")
        print("doctor: " + ("problems found" if failed else "ok"))
    return 1 if failed else 0
