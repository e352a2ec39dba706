"""`edge-sdk device update SOURCE`: fetch -> verify -> install in the free slot -> switch -> restart
-> health check -> commit, or switch back.

Every step leaves `current` naming a verified slot: the download and the verification work in a
staging directory, the install replaces only the slot that is not serving, and the switch is one
rename recorded as a trial first (see slots.py). ``hook(step)`` is called at each step boundary
(tests stop the process there).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edge_sdk.bundle import _load_key, verify_bundle
from edge_sdk.errors import BundleError, ConfigError, EdgeSDKError
from edge_sdk.manifest import MANIFEST

from .fetch import FetchSettings, Hook, fetch
from .health import HealthCheck, HealthCheckError, run_check
from .slots import SLOTS, SlotStore

log = logging.getLogger(__name__)
STAGING = ".incoming"
Report = Callable[..., None]  # report(kind, **fields): a telemetry event


class DownloadInterrupted(BundleError):
    """The transfer stopped before every byte came; the next update resumes it."""


@dataclass
class Device:
    """What an update acts on; the outside world (restart, health, telemetry) is passed in."""

    slots: SlotStore
    key: Path  # trusted ed25519 public key (the daemon config's bundle_key)
    restart: Callable[[], None]  # make the daemon load `current` again (systemctl restart edge-sdk)
    health: HealthCheck | None = None  # None: no daemon to check (staging an image)
    board: str | None = None
    report: Report = field(default=lambda kind, **fields: None)
    hook: Hook = field(default=lambda step: None)


def key_fingerprint(key: Path) -> str:
    ser = __import__("cryptography.hazmat.primitives.serialization", fromlist=["x"])
    raw = _load_key(key, private=False).public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def bundle_info(manifest: dict, digest: str, key: Path) -> dict:
    source = manifest.get("source") or {}
    return {"version": str(manifest.get("version") or source.get("name") or "?"), "hash": digest,
            "signer": key_fingerprint(key), "boards": manifest.get("boards") or (manifest.get("target") or {}).get("boards") or []}


def check_board(manifest: dict, board: str | None, where: str) -> None:
    targets = manifest.get("boards") or (manifest.get("target") or {}).get("boards")
    if board and targets and board not in targets:
        raise BundleError(f"{where}: bundle made for {', '.join(map(str, targets))}, not this board ({board})",
                          hint=f"publish a bundle converted with --board {board}")


def update(source: str, device: Device) -> dict:
    """Install and activate the bundle at `source`; returns what happened. Raises a one-line EdgeSDKError
    when it is refused (the serving bundle untouched) or when it failed its health check (switched back)."""
    slots = device.slots
    slots.ensure()
    settle(device)
    staging = slots.root / STAGING
    try:
        device.hook("fetch")
        fetch(source, staging, FetchSettings(key=device.key), device.hook)
        device.hook("verify")
        verified = verify_bundle(staging, device.key, require_signature=True)
        verified.close()
        check_board(verified, device.board, source)
    except EdgeSDKError as exc:
        if "truncated" in exc.message or "cannot be fetched" in exc.message or "download failed" in exc.message:
            device.report("update_refused", source=source, reason=str(exc), resumable=True)
            raise DownloadInterrupted(exc.message, hint=exc.hint) from None
        shutil.rmtree(staging, ignore_errors=True)
        device.report("update_refused", source=source, reason=str(exc))
        raise
    info = bundle_info(verified, verified.digest, device.key)
    active = slots.active()
    if active and slots.state()["slots"].get(active, {}).get("hash") == info["hash"]:
        shutil.rmtree(staging, ignore_errors=True)
        return {"result": "unchanged", "slot": active, **info}
    slot = slots.inactive()
    device.hook("install")
    slots.install(staging, slot, info)
    return activate(device, slot, info)


def activate(device: Device, slot: str, info: dict | None = None) -> dict:
    """Switch to `slot` as a trial, restart, check; commit, or switch back and raise."""
    slots = device.slots
    previous = slots.active()
    device.hook("switch")
    slots.begin_trial(slot)
    device.hook("switching")
    slots.switch(slot)
    device.hook("switched")
    device.restart()
    device.hook("restarted")
    try:
        checked = run_check(device.health) if device.health else {}
    except HealthCheckError as exc:
        now = slots.roll_back(str(exc))
        device.report("update_rolled_back", slot=slot, reason=str(exc), serving=now)
        if now and now != slot:
            device.restart()
            _recheck(device)
        raise HealthCheckError(f"slot {slot} failed its health check ({exc.message}): switched back to slot {now or 'none'}",
                               hint="the previous bundle serves; see `edge-sdk device status`") from None
    slots.commit(slot)
    result = {"result": "updated", "slot": slot, "previous": previous, **(info or {}), **checked}
    device.report("update_done", slot=slot, hash=(info or {}).get("hash", ""))
    return result


def _recheck(device: Device) -> None:
    if device.health is None:
        return
    try:
        run_check(device.health)
    except HealthCheckError as exc:
        log.error("the previous slot is not healthy either: %s", exc)


def settle(device: Device) -> None:
    """A trial left by an interrupted update: keep it if the daemon passes its check now, else switch back."""
    slots = device.slots
    trial = slots.state()["trial"]
    if trial is None:
        return
    if slots.active() != trial["slot"]:
        slots.boot_check()  # the switch never happened
        return
    try:
        if device.health:
            run_check(device.health)
    except HealthCheckError as exc:
        slots.roll_back(f"interrupted update: {exc.message}")
        device.restart()
        return
    slots.commit(trial["slot"])


def rollback(device: Device) -> dict:
    """Switch to the other slot (verified first), restart and check it; a failing check switches back."""
    slots = device.slots
    active = slots.active()
    target = "a" if active is None else ("b" if active == "a" else "a")
    if not slots.path(target).is_dir():
        raise BundleError(f"slot {target} holds no bundle", hint="nothing to roll back to: install one with `edge-sdk device update`")
    try:
        verified = verify_bundle(slots.path(target), device.key, require_signature=True)
    except EdgeSDKError as exc:
        device.report("rollback_refused", slot=target, reason=str(exc))
        raise BundleError(f"slot {target} is corrupt on disk: {exc.message}",
                          hint="slot left as it is; install a good bundle with `edge-sdk device update`") from None
    verified.close()
    return activate(device, target, bundle_info(verified, verified.digest, device.key))


def status(slots: SlotStore, key: Path | None) -> dict:
    """Both slots: version, hash, signer, health, and whether they verify now."""
    state = slots.state()
    active = slots.active()
    out = {"active": active, "trial": state["trial"], "slots": {}}
    for slot in SLOTS:
        path = slots.path(slot)
        entry = {**state["slots"].get(slot, {}), "active": slot == active}
        if not (path / MANIFEST).exists():
            entry["verified"] = "empty"
        else:
            try:
                v = verify_bundle(path, key, require_signature=key is not None)
                v.close()
                entry.update(bundle_info(v, v.digest, key) if key else {"hash": v.digest})
                entry["verified"] = "ok"
            except EdgeSDKError as exc:
                entry["verified"] = f"corrupt: {exc.message}"
        out["slots"][slot] = entry
    return out


def check_config_bundle(configured: str, slots: SlotStore) -> None:
    if Path(configured).absolute() != slots.link.absolute():
        raise ConfigError(f"the daemon serves {configured or 'no bundle'}, not the slot link {slots.link}",
                          hint=f'set bundle = "{slots.link}" in the config so that updates reach the daemon')
