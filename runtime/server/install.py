"""`edge-sdk device install [--root DIR]`: put the daemon in place on a Jetson, idempotently.

Steps: the `edge-sdk` system user and group (member of dialout for the telemetry UART), the state
directory, the default config (never overwritten once there), the systemd unit and the udev rule
(rewritten only when they differ). Every path lives under `root`, so the same code installs onto
the device (`/`) or a test's fake root; only on `/` are systemd and udev told to reload.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ...errors import ConfigError, PlatformError

USER = "edge-sdk"
EXTRA_GROUPS = ("dialout", "video", "render")
STATE_DIR = "var/lib/edge-sdk"
CONFIG = "etc/edge-sdk/edge-sdk.toml"
UNIT = "etc/systemd/system/edge-sdk.service"
ROLLBACK_UNIT = "etc/systemd/system/edge-sdk-rollback.service"  # OnFailure= of the daemon (docs/fleet.md)
UDEV_RULE = "etc/udev/rules.d/99-edge-sdk-serial.rules"
SYSUSERS = "usr/lib/sysusers.d/edge-sdk.conf"
SYSTEM_IDS = range(999, 100, -1)  # system accounts count down from 999, like useradd --system


@dataclass(frozen=True)
class Step:
    what: str
    path: str
    result: str  # "created" | "updated" | "unchanged" | "ran" | "skipped"


def shipped(name: str) -> str:
    return resources.files("edge_sdk.jetson").joinpath(name).read_text()


def edge_sdk_command() -> str:
    """How systemd should start the CLI of this installation."""
    exe = shutil.which("edge-sdk") or str(Path(sys.executable).with_name("edge-sdk"))
    return exe if Path(exe).exists() else f"{sys.executable} -m edge_sdk.cli.main"


def install(root: str | Path = "/", *, bundle: str | None = None, reload: bool = True) -> list[Step]:
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"install root {root} is not a directory", hint="create it or pass an existing --root")
    on_device = root.resolve() == Path("/")
    if on_device and os.geteuid() != 0:
        raise PlatformError("installing onto / needs root", hint="run it with sudo, or pass --root DIR to stage a root")
    steps = [*ensure_user(root, on_device)]
    steps.append(ensure_dir(root / STATE_DIR, 0o750, root, on_device))
    steps.append(ensure_dir(root / CONFIG, 0o750, root, on_device, parent_only=True))
    steps.append(write_if_absent(root / CONFIG, default_config(bundle), "config"))
    unit = shipped("edge-sdk.service").replace("/usr/local/bin/edge-sdk", edge_sdk_command())
    steps.append(write_if_changed(root / UNIT, unit, "systemd unit"))
    rollback = shipped("edge-sdk-rollback.service").replace("/usr/local/bin/edge-sdk", edge_sdk_command())
    steps.append(write_if_changed(root / ROLLBACK_UNIT, rollback, "rollback unit"))
    steps.append(write_if_changed(root / UDEV_RULE, shipped("99-edge-sdk-serial.rules"), "udev rule"))
    if on_device and reload:
        steps += [run(["systemctl", "daemon-reload"]), run(["udevadm", "control", "--reload-rules"]),
                  run(["udevadm", "trigger", "--subsystem-match=tty"])]
    return [s for s in steps if s is not None]


def default_config(bundle: str | None) -> str:
    text = shipped("edge-sdk.toml")
    if bundle:
        text = re.sub(r'^bundle = "[^"]*"', f'bundle = "{Path(bundle).absolute()}"', text, count=1, flags=re.M)
    return text


def write_if_changed(path: Path, text: str, what: str, mode: int = 0o644) -> Step:
    old = path.read_text() if path.exists() else None
    if old == text:
        return Step(what, str(path), "unchanged")
    _atomic_write(path, text, mode)
    return Step(what, str(path), "created" if old is None else "updated")


def write_if_absent(path: Path, text: str, what: str) -> Step:
    if path.exists():
        return Step(what, str(path), "unchanged")  # the operator's edits are kept
    _atomic_write(path, text, 0o640)
    return Step(what, str(path), "created")


def _atomic_write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def ensure_dir(path: Path, mode: int, root: Path, on_device: bool, parent_only: bool = False) -> Step | None:
    target = path.parent if parent_only else path
    existed = target.is_dir()
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(target, mode)
    if on_device:
        shutil.chown(target, USER, USER)
    if parent_only:
        return None if existed else Step("directory", str(target), "created")
    return Step("state directory", str(target), "unchanged" if existed else "created")


def ensure_user(root: Path, on_device: bool) -> list[Step]:
    sysusers = ('# edge-sdk daemon account (systemd-sysusers format)\n'
                f'u {USER} - "edge-sdk daemon" /{STATE_DIR} /usr/sbin/nologin\n'
                + "".join(f"m {USER} {g}\n" for g in EXTRA_GROUPS))
    steps = [write_if_changed(root / SYSUSERS, sysusers, "sysusers entry")]
    if on_device:
        if shutil.which("systemd-sysusers"):
            steps.append(run(["systemd-sysusers", str(root / SYSUSERS)]))
        elif subprocess.run(["getent", "passwd", USER], capture_output=True).returncode != 0:
            steps.append(run(["useradd", "--system", "--user-group", "--home-dir", f"/{STATE_DIR}", "--no-create-home",
                              "--shell", "/usr/sbin/nologin", "--groups", ",".join(EXTRA_GROUPS), USER]))
        return steps
    return steps + [_user_in_files(root)]


def _read_db(path: Path) -> list[list[str]]:
    return [line.split(":") for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _user_in_files(root: Path) -> Step:
    """A staged root: the account goes straight into its etc/passwd and etc/group."""
    passwd, group = root / "etc" / "passwd", root / "etc" / "group"
    users, groups = _read_db(passwd), _read_db(group)
    changed = False
    if not any(g[0] == USER for g in groups):
        used = {int(g[2]) for g in groups if len(g) > 2 and g[2].isdigit()} | {int(u[2]) for u in users if len(u) > 2 and u[2].isdigit()}
        gid = next(i for i in SYSTEM_IDS if i not in used)
        groups.append([USER, "x", str(gid), ""])
        changed = True
    gid = next(g[2] for g in groups if g[0] == USER)
    if not any(u[0] == USER for u in users):
        used = {int(u[2]) for u in users if len(u) > 2 and u[2].isdigit()}
        uid = gid if int(gid) not in used else str(next(i for i in SYSTEM_IDS if i not in used))
        users.append([USER, "x", str(uid), gid, "edge-sdk daemon", f"/{STATE_DIR}", "/usr/sbin/nologin"])
        changed = True
    for g in groups:
        if g[0] in EXTRA_GROUPS and len(g) == 4:
            members = [m for m in g[3].split(",") if m]
            if USER not in members:
                g[3] = ",".join([*members, USER])
                changed = True
    if not changed:
        return Step("service user", str(passwd), "unchanged")
    existed = passwd.exists()
    _atomic_write(group, "".join(":".join(g) + "\n" for g in groups), 0o644)
    _atomic_write(passwd, "".join(":".join(u) + "\n" for u in users), 0o644)
    return Step("service user", str(passwd), "updated" if existed else "created")


def run(cmd: list[str]) -> Step:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PlatformError(f"{cmd[0]} failed: {exc}", hint="run the step by hand, then install again") from exc
    if done.returncode != 0:
        raise PlatformError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}", hint="fix the cause and install again")
    return Step(cmd[0], " ".join(cmd[1:]), "ran")
