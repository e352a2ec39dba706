"""A/B bundle slots under the state directory, switched by one rename.

Layout (``<state>/slots``)::

    a/, b/          two verified bundles (one may be absent)
    current -> a    the bundle the daemon serves (config: bundle = "<state>/slots/current")
    state.json      the trial in progress and each slot's health, written by rename (fsync'd)
    .incoming-*     a download in progress (resumed by the next update; never served)

The switch writes ``current.tmp -> b`` and renames it over ``current`` (rename(2) is atomic), then
fsyncs the directory: after a power cut ``current`` names the old slot or the new one, never
neither. The trial is recorded before the switch, so a crash anywhere after it is settled by the
boot counter: each daemon start during a trial counts one boot; past ``max_boots`` the device
switches back to the previous slot by itself (``boot_check``, run by the systemd unit before start).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from edge_sdk.errors import BundleError
from edge_sdk.fsutil import fsync_path

log = logging.getLogger(__name__)
SLOTS = ("a", "b")
LINK = "current"
STATE = "state.json"
MAX_BOOTS = 3  # daemon starts a new slot gets before it is given up


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


class SlotStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.link = self.root / LINK

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{LINK}.tmp*"):
            stale.unlink(missing_ok=True)

    # ---- which slot serves -------------------------------------------------------------------
    def active(self) -> str | None:
        try:
            target = os.readlink(self.link)
        except (FileNotFoundError, OSError):
            return None
        return target if target in SLOTS else None

    def inactive(self) -> str:
        active = self.active()
        return "a" if active is None else other(active)

    def path(self, slot: str) -> Path:
        return self.root / slot

    def switch(self, slot: str) -> None:
        """Point `current` at `slot` with one rename, then make the rename durable."""
        assert slot in SLOTS
        tmp = self.root / f".{LINK}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(slot, tmp)
        os.replace(tmp, self.link)
        fsync_path(self.root)

    # ---- state.json --------------------------------------------------------------------------
    def state(self) -> dict:
        try:
            data = json.loads((self.root / STATE).read_text())
        except FileNotFoundError:
            return {"trial": None, "slots": {}}
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s): starting a new one", self.root / STATE, exc)
            return {"trial": None, "slots": {}}
        if not isinstance(data, dict):
            return {"trial": None, "slots": {}}
        trial = data.get("trial")
        ok = isinstance(trial, dict) and trial.get("slot") in SLOTS and isinstance(trial.get("boots"), int)
        slots = data.get("slots") if isinstance(data.get("slots"), dict) else {}
        return {"trial": trial if ok else None, "slots": {k: v for k, v in slots.items() if k in SLOTS and isinstance(v, dict)}}

    def write_state(self, state: dict) -> None:
        tmp = self.root / f".{STATE}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / STATE)
        fsync_path(self.root)

    def mark(self, slot: str, **fields) -> None:
        state = self.state()
        state["slots"][slot] = {**state["slots"].get(slot, {}), **fields}
        self.write_state(state)

    # ---- installing ----------------------------------------------------------------------------
    def install(self, staging: Path, slot: str, info: dict) -> None:
        """Replace `slot` (never the active one) by the verified staging directory."""
        if slot == self.active():
            raise BundleError(f"slot {slot} is serving; it cannot be replaced", hint="update again: the other slot is used")
        target = self.path(slot)
        if target.exists() or target.is_symlink():
            trash = self.root / f".trash-{slot}-{os.getpid()}"
            os.rename(target, trash)
            fsync_path(self.root)
            shutil.rmtree(trash, ignore_errors=True)
        for stale in self.root.glob(".trash-*"):
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(staging, target)
        fsync_path(self.root)
        state = self.state()
        state["slots"][slot] = {**info, "health": "unknown", "installed_at": int(time.time())}
        self.write_state(state)

    # ---- trial, commit, rollback ---------------------------------------------------------------
    def begin_trial(self, slot: str) -> None:
        """Record the trial (durably), then switch to it."""
        state = self.state()
        state["trial"] = {"slot": slot, "previous": self.active(), "boots": 0, "started_at": int(time.time())}
        self.write_state(state)

    def commit(self, slot: str) -> None:
        state = self.state()
        state["trial"] = None
        state["slots"][slot] = {**state["slots"].get(slot, {}), "health": "good", "checked_at": int(time.time())}
        self.write_state(state)

    def roll_back(self, reason: str) -> str | None:
        """Switch back to the slot the trial replaced; the trial slot is marked bad. Returns the slot now serving."""
        state = self.state()
        trial = state["trial"]
        if trial is None:
            return self.active()
        previous = trial.get("previous")
        if previous in SLOTS and self.path(previous).is_dir() and self.active() != previous:
            self.switch(previous)
        state["trial"] = None
        state["slots"][trial["slot"]] = {**state["slots"].get(trial["slot"], {}), "health": "bad", "reason": reason}
        self.write_state(state)
        log.warning("slot %s given up (%s): serving slot %s", trial["slot"], reason, self.active())
        return self.active()

    def boot_check(self, max_boots: int = MAX_BOOTS) -> str:
        """Before each daemon start: settle a crashed switch, count a trial boot, give up a trial past max_boots."""
        self.ensure()
        state = self.state()
        trial = state["trial"]
        if trial is None:
            return "no trial"
        if self.active() != trial["slot"]:  # the crash came before the switch: the old slot still serves
            state["trial"] = None
            self.write_state(state)
            return f"switch to {trial['slot']} never happened: slot {self.active()} serves"
        if trial["boots"] >= max_boots:
            now = self.roll_back(f"daemon did not pass its health check in {max_boots} starts")
            return f"slot {trial['slot']} failed {max_boots} starts: rolled back to slot {now}"
        trial["boots"] += 1
        self.write_state(state)
        return f"slot {trial['slot']} on trial: start {trial['boots']} of {max_boots}"
