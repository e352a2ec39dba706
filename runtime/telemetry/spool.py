"""Command spool: hand downlink commands to a running ``listen`` through a directory.

The ground's port belongs to the listener, so other processes drop a request file in the spool
directory; the listener sends it over the link and writes the result beside it. Files are written
to a temporary name and renamed, so neither side reads half a file.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from edge_sdk.errors import EdgeSDKError, TelemetryError

from .commands import parse_args

log = logging.getLogger(__name__)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class CommandSpool:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    # ---- client side --------------------------------------------------------------------------
    def submit(self, command: str, args: list[str], stream: str | None = None, timeout: float = 15.0) -> dict:
        """Queue a command for the listener and wait for its result (a CommandResult.as_dict())."""
        parse_args(command, args)  # fail here, not on the listener
        name = f"{time.time_ns()}-{secrets.token_hex(4)}"
        _write_json(self.dir / f"{name}.request.json", {"command": command, "args": args, "stream": stream, "timeout": timeout})
        result = self.dir / f"{name}.result.json"
        deadline = time.monotonic() + timeout + 5
        while time.monotonic() < deadline:
            if result.exists():
                out = json.loads(result.read_text())
                result.unlink()
                return out
            time.sleep(0.05)
        raise TelemetryError(f"no result from the listener within {timeout + 5:.0f} s",
                             hint=f"is `edge-sdk telemetry listen ... --commands {self.dir}` running?")

    # ---- listener side ------------------------------------------------------------------------
    def serve(self, ground, stop: threading.Event) -> None:
        """Send requests found in the directory through ``ground`` until stop is set."""
        while not stop.wait(0.1):
            for request in sorted(self.dir.glob("*.request.json")):
                taken = request.with_name(request.name.replace(".request.json", ".taken"))
                try:
                    os.rename(request, taken)
                except FileNotFoundError:
                    continue
                out = self._run(ground, taken)
                _write_json(request.with_name(request.name.replace(".request.json", ".result.json")), out)
                taken.unlink(missing_ok=True)

    def _run(self, ground, taken: Path) -> dict:
        try:
            req = json.loads(taken.read_text())
            typed = parse_args(req["command"], [str(a) for a in req.get("args", [])])
            if req.get("stream"):
                stream = int(req["stream"], 16)
            elif len(ground.streams) == 1:
                stream = next(iter(ground.streams))
            else:
                raise TelemetryError(f"{len(ground.streams)} device streams seen; the request must name one",
                                     hint="pass --stream HEX")
            return ground.send_command(stream, req["command"], *typed, timeout=float(req.get("timeout", 15))).as_dict()
        except (EdgeSDKError, ValueError, KeyError) as exc:
            log.warning("command request %s failed: %s", taken.name, exc)
            return {"status": "error", "message": str(exc)}
