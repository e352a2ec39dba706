"""The `update` downlink command: start `edge-sdk device update SOURCE` outside the daemon.

The updater restarts the daemon, so it must not live in the daemon's process group or cgroup: on a
systemd device it runs as its own transient unit (systemd-run), elsewhere in a new session. The
command only starts it; the outcome arrives as telemetry events (update_done, update_refused,
update_rolled_back) queued by the updater.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from edge_sdk.errors import EdgeSDKError

from .fetch import is_url

MAX_SOURCE = 2048


@dataclass(frozen=True)
class UpdateLauncher:
    command: tuple[str, ...]  # argv before SOURCE, e.g. ("edge-sdk", "device", "update")
    after: tuple[str, ...] = ()  # argv after SOURCE, e.g. ("--config", "/etc/edge-sdk/edge-sdk.toml")
    systemd_run: bool = False

    @classmethod
    def for_device(cls, config_path: str = "/etc/edge-sdk/edge-sdk.toml") -> "UpdateLauncher":
        exe = shutil.which("edge-sdk")
        base = (exe,) if exe else (sys.executable, "-m", "edge_sdk.cli.main")
        return cls((*base, "device", "update"), ("--config", config_path), systemd_run=shutil.which("systemd-run") is not None)

    def __call__(self, source: str) -> str:
        if not isinstance(source, str) or not is_url(source) or len(source) > MAX_SOURCE or any(c.isspace() for c in source):
            raise EdgeSDKError(f"update source {str(source)[:80]!r} is not an http(s) URL", hint="send the URL of a bundle or its tarball")
        argv = [*self.command, source, *self.after]
        if self.systemd_run:
            argv = ["systemd-run", "--collect", "--quiet", f"--unit=edge-sdk-update-{int(time.time())}", *argv]
        try:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise EdgeSDKError(f"cannot start the updater: {exc}", hint="run `edge-sdk device update SOURCE` on the device") from None
        return "started"
