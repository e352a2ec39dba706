"""Power modes through nvpmodel, their change log, and energy per token from the rails."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ...boards import PowerMode
from ...errors import ConfigError, PowerModeError
from .nvpmodel_conf import NvpConf, PowerModel, parse_conf
from .platform import Platform
from .root import NVPMODEL_CONF

log = logging.getLogger("edge_sdk.power")


@dataclass
class ModeChange:
    time: float  # unix seconds
    old: str
    new: str
    reason: str
    reboot: bool = False

    def to_dict(self) -> dict:
        return {"time": self.time, "old": self.old, "new": self.new, "reason": self.reason, "reboot": self.reboot}


class RebootRequiredError(PowerModeError):
    """A mode switch that restarts the device, asked for without allowing it. The hint speaks
    Python; the CLI raises it again with `how` naming its flag."""

    def __init__(self, old: str, new: str, how: str = "pass allow_reboot=True"):
        super().__init__(f"switching {old} -> {new} needs a reboot", hint=f"{how} to accept it; the device restarts")
        self.old, self.new = old, new


def _budget_w(name: str, profile_mode: PowerMode | None) -> float:
    if profile_mode is not None:
        return float(profile_mode.budget_w)
    m = re.search(r"(\d+)W", name)
    return float(m[1]) if m else float("inf")


def mode_rank(m: PowerMode) -> tuple:
    """Order of modes from least to most performance: budget, then GPU and CPU caps (None = uncapped)."""
    inf = float("inf")
    return (m.budget_w, m.gpu_max_mhz or inf, m.cpu_max_mhz or inf, m.cores_online, m.id)


class PowerManager:
    """nvpmodel modes of a platform: list, read, switch (refusing reboots unless allowed), policies."""

    def __init__(self, platform: Platform):
        self.platform = platform
        self.events: list[ModeChange] = []
        self._listeners: list[Callable[[ModeChange], None]] = []

    def conf(self) -> NvpConf:
        text = self.platform.sys.read(NVPMODEL_CONF)
        if text is None:
            raise PowerModeError(f"no nvpmodel configuration at {self.platform.sys.path(NVPMODEL_CONF)}",
                                 hint="on a Jetson, reinstall nvidia-l4t-nvpmodel; elsewhere use --emulate BOARD")
        return parse_conf(text)

    def _mode(self, model: PowerModel, default_id: int | None) -> PowerMode:
        profile = self.platform.board().profile
        pm = next((m for m in profile.power_modes if m.id == model.id), None) if profile else None
        cpu = model.cap("CPU_A78_0")
        gpu = model.cap("GPU")
        emc = model.cap("EMC")
        return PowerMode(id=model.id, name=model.name, cores_online=model.cores_online,
                         cpu_max_mhz=cpu / 1000 if cpu else None, gpu_max_mhz=gpu / 1e6 if gpu else None,
                         emc_max_mhz=emc / 1e6 if emc else None, tpc_pg_mask=model.tpc_pg_mask,
                         budget_w=_budget_w(model.name, pm), default=model.id == default_id)

    def modes(self) -> list[PowerMode]:
        conf = self.conf()
        return [self._mode(m, conf.default_id) for m in conf.models]

    def mode(self, key: int | str) -> PowerMode:
        for m in self.modes():
            if str(m.id) == str(key) or m.name.lower() == str(key).lower():
                return m
        valid = ", ".join(f"{m.id}={m.name}" for m in self.modes())
        raise PowerModeError(f"no power mode {key!r} on this board", hint=f"valid modes: {valid}")

    def current(self) -> PowerMode:
        return self.mode(parse_query(self.platform.run(["nvpmodel", "-q"]).stdout)[1])

    def needs_reboot(self, new: PowerMode, old: PowerMode | None = None) -> bool:
        """Board data (boards.json reboot_rule, unverified): a change of online cores or TPC mask."""
        old = old or self.current()
        profile = self.platform.board().profile
        ids = {m.id for m in profile.power_modes} if profile else set()
        if old.id in ids and new.id in ids:
            return profile.needs_reboot(profile.mode(old.id), profile.mode(new.id))
        return old.cores_online != new.cores_online or (old.tpc_pg_mask or 0) != (new.tpc_pg_mask or 0)

    def set(self, key: int | str | PowerMode, allow_reboot: bool = False, reason: str = "requested") -> ModeChange | None:
        """Switch with `nvpmodel -m`; None when already there. A reboot-requiring switch needs allow_reboot."""
        new = key if isinstance(key, PowerMode) else self.mode(key)
        old = self.current()
        if new.id == old.id:
            return None
        reboot = self.needs_reboot(new, old)
        if reboot and not allow_reboot:
            raise RebootRequiredError(old.name, new.name)
        proc = self.platform.run(["nvpmodel", "-m", str(new.id)], input="YES\n" if reboot else "", check=False, timeout=30)
        if proc.returncode != 0 or "NVPM ERROR" in proc.stdout + proc.stderr:
            raise PowerModeError(f"nvpmodel -m {new.id} failed: {(proc.stdout + proc.stderr).strip()[-200:]}")
        change = ModeChange(time=time.time(), old=old.name, new=new.name, reason=reason, reboot=reboot)
        self.events.append(change)
        log.info("power mode %s -> %s (%s)", old.name, new.name, reason)
        for listener in self._listeners:
            listener(change)
        return change

    def subscribe(self, listener: Callable[[ModeChange], None]) -> None:
        """Called with every ModeChange (telemetry hooks in here)."""
        self._listeners.append(listener)

    def reachable(self, allow_reboot: bool = False, current: PowerMode | None = None) -> list[PowerMode]:
        """Modes a policy may step through, by budget ascending."""
        current = current or self.current()
        modes = [m for m in self.modes() if m.id == current.id or allow_reboot or not self.needs_reboot(m, current)]
        return sorted(modes, key=mode_rank)

    def run_policy(self, policy, snapshot, allow_reboot: bool = False) -> ModeChange | None:
        """One policy tick: ask the policy for a mode and switch to it, logging the reason."""
        current = self.current()
        decision = policy.decide(snapshot, current, self.reachable(allow_reboot, current), self.platform)
        if decision is None or decision[0].id == current.id:
            return None
        target, reason = decision
        return self.set(target, allow_reboot=allow_reboot, reason=f"{policy.name}: {reason}")


def parse_query(out: str) -> tuple[str, int]:
    """(name, id) from `nvpmodel -q [--verbose]` output (NVPM WARN/VERB lines may come first)."""
    m = re.search(r"^NV Power Mode: (\S+)\s*\n\s*(\d+)\s*$", out, re.M)
    if not m:
        raise PowerModeError(f"cannot read the power mode from 'nvpmodel -q': {out.strip()[:120]!r}")
    return m[1], int(m[2])


def parse_power_models(out: str) -> list[tuple[int, str]]:
    """[(id, name)] from `nvpmodel -p --verbose` output."""
    return [(int(i), n) for i, n in re.findall(r"NVPM VERB: POWER_MODEL: ID=(\d+) NAME=(\S+)", out)]


def integrate_energy(samples: list[tuple[float, float]]) -> float:
    """Joules from (seconds, mW) samples, trapezoidal."""
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(samples, samples[1:])) / 1000


@dataclass
class EnergyMeter:
    """Samples board input power on a thread while a workload runs; energy per token from the rails."""

    platform: Platform
    interval_s: float = 0.1
    samples: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self):
        if not 0.001 <= self.interval_s <= 60:
            raise ConfigError(f"energy meter interval {self.interval_s} s out of range", hint="use 0.001 to 60 seconds")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        mw = self.platform.power_mw()
        if mw is not None:
            self.samples.append((time.monotonic(), float(mw)))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "EnergyMeter":
        self.samples.clear()
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="energy-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.sample()

    @property
    def joules(self) -> float:
        return integrate_energy(self.samples)

    @property
    def mean_w(self) -> float | None:
        if len(self.samples) < 2:
            return None
        return self.joules / (self.samples[-1][0] - self.samples[0][0])

    def per_token(self, tokens: int) -> float | None:
        """Joules per token (None when nothing was generated or the board has no rails)."""
        return self.joules / tokens if tokens > 0 and len(self.samples) >= 2 else None
