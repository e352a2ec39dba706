"""The `edge-sdk` command: one parser, one subcommand module each, one error printer."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

from ..version import __version__
from ..errors import EdgeSDKError

# subcommand -> module in edge_sdk.cli that registers it (imports stay light: handlers import
# heavy dependencies only when they run)
COMMANDS = {
    "convert": "convert",
    "plan": "plan",
    "verify": "verify",
    "run": "run",
    "bench": "run",
    "serve": "serve",
    "engine": "engine",
    "doctor": "doctor",
    "power": "power",
    "emulate": "emulate",
    "telemetry": "telemetry",
    "device": "device",
}


def add_device_options(p: argparse.ArgumentParser) -> None:
    """Options every device-side command takes: which board root to read and steer."""
    p.add_argument("--emulate", metavar="BOARD", default=os.environ.get("EDGE_SDK_EMULATE"),
                   help="run against an emulated board (agx-orin-64gb, agx-orin-32gb, orin-nx-16gb, orin-nano-8gb); env EDGE_SDK_EMULATE")
    p.add_argument("--root", metavar="DIR", default=os.environ.get("EDGE_SDK_ROOT"),
                   help="filesystem root holding /sys, /proc, /etc of the board (default /, with --emulate "
                        "$EDGE_SDK_CACHE/emulated/BOARD); env EDGE_SDK_ROOT")


def emulated_root(board: str, environ=None) -> str:
    """The user's emulated root of `board` (under the cache directory)."""
    from ..paths import cache_dir
    from ..runtime.platform.emulator import default_root

    return str(default_root(board, cache_dir(environ)))


def resolve_device_root(args, environ=None) -> None:
    """--emulate without --root: the user's emulated root, resolved here so the runtime gets a directory."""
    if getattr(args, "emulate", None) and not getattr(args, "root", None):
        args.root = emulated_root(args.emulate, environ)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-sdk",
        description="Take DeepSeek models to NVIDIA Jetson devices: convert, plan, run, serve, steer, report.",
    )
    parser.add_argument("--version", action="version", version=f"edge-sdk {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(f"edge_sdk.cli.{module}").register(sub)
    return parser


def _reader_went_away() -> int:
    """The reader of stdout closed it (`edge-sdk ... | head`): stop quietly, as a SIGPIPE would.
    stdout goes to devnull so that the interpreter's own flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_device_root(args)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:
        return _reader_went_away()
    except EdgeSDKError as exc:
        if args.debug:
            raise
        print(f"edge-sdk {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"edge-sdk {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
