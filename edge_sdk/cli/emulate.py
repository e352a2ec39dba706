"""`edge-sdk emulate BOARD --root DIR`: lay out (or reuse) an emulated board root, optionally simulate it."""

from __future__ import annotations

from ._common import print_json


def register(sub) -> None:
    p = sub.add_parser("emulate", help="lay out an emulated Jetson root with fake nvpmodel/jetson_clocks/tegrastats")
    p.add_argument("board", help="agx-orin-64gb, agx-orin-32gb, orin-nx-16gb or orin-nano-8gb")
    p.add_argument("--root", metavar="DIR", help="where to lay it out (default: ~/.cache/edge-sdk/emulated/BOARD)")
    p.add_argument("--simulate", action="store_true", help="run the board simulation in the foreground (Ctrl-C stops it)")
    p.add_argument("--pid", type=int, default=0, help="with --simulate: process whose CPU load drives the board (default: idle)")
    p.add_argument("--seconds", type=float, default=None, help="with --simulate: stop after this many seconds")
    p.add_argument("--interval", type=float, default=0.5, help="with --simulate: seconds between ticks")
    p.add_argument("--json", action="store_true", help="print the root and board as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..paths import cache_dir
    from ..runtime.platform import Platform, emulated_root
    from ..runtime.platform.emulator import default_root

    root = emulated_root(args.board, args.root or default_root(args.board, cache_dir()))
    info = {"board": args.board, "root": str(root), "bin": str(root / "bin"),
            "env": {"EDGE_SDK_ROOT": str(root), "PATH_prefix": str(root / "bin")}}
    if args.json:
        print_json(info)
    else:
        b = Platform(root).board()
        print(f"emulated {b.profile.title} (L4T {b.l4t}, JetPack {b.jetpack}) at {root}")
        print(f"use it with: --root {root}   (or export EDGE_SDK_ROOT={root}; tools in {root}/bin)")
    if args.simulate:
        from ..runtime.platform.simulation import run as simulate

        try:
            simulate(str(root), args.pid or None, args.interval, args.seconds)
        except KeyboardInterrupt:
            pass
    return 0
