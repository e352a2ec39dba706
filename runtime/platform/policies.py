"""Power policies: each looks at a snapshot and the reachable modes and names a mode with a reason.

Reachable modes come sorted by power budget ascending (switches that would need a reboot are left out
unless allowed). A policy never switches itself: PowerManager.run_policy does, and logs the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...boards import PowerMode
from ...errors import ConfigError
from .snapshot import Snapshot

DEFAULT_TRIP_MC = 99000  # tj passive trip on Orin when the zone reports none


def _index(modes: list[PowerMode], current: PowerMode) -> int:
    return next(i for i, m in enumerate(modes) if m.id == current.id)


@dataclass
class Performance:
    name: str = "performance"

    def decide(self, snap: Snapshot, current: PowerMode, modes: list[PowerMode], platform=None):
        top = modes[-1]
        return (top, f"highest budget reachable ({top.budget_w:g} W)") if top.id != current.id else None


@dataclass
class Efficiency:
    """Least energy per token: measure each reachable mode once (record()), then settle on the best."""

    name: str = "efficiency"
    joules_per_token: dict[str, float] = field(default_factory=dict)  # mode name -> J/token

    def record(self, mode: PowerMode | str, joules_per_token: float) -> None:
        self.joules_per_token[mode if isinstance(mode, str) else mode.name] = joules_per_token

    def decide(self, snap: Snapshot, current: PowerMode, modes: list[PowerMode], platform=None):
        unmeasured = [m for m in modes if m.name not in self.joules_per_token]
        if unmeasured:
            if current in unmeasured:
                return None
            return unmeasured[0], "measuring energy per token in this mode"
        best = min(modes, key=lambda m: self.joules_per_token[m.name])
        if best.id == current.id:
            return None
        return best, f"least energy per token ({self.joules_per_token[best.name]:.3f} J vs {self.joules_per_token.get(current.name, float('nan')):.3f} J)"


@dataclass
class PowerCap:
    """Stay under a power cap: the highest budget at or below it, one step down when measured over it."""

    watts: float
    headroom: float = 0.85  # step back up only when measured power is under this share of the cap
    name: str = "power-cap"

    def __post_init__(self):
        if not self.watts > 0:
            raise ConfigError(f"power cap must be a positive number of watts, got {self.watts}", hint="e.g. --watts 20")

    def decide(self, snap: Snapshot, current: PowerMode, modes: list[PowerMode], platform=None):
        total_mw = snap.total_power_mw(platform.total_rails() if platform else None)
        i = _index(modes, current)
        if total_mw is not None and total_mw > self.watts * 1000 and i > 0:
            return modes[i - 1], f"measured {total_mw / 1000:.1f} W over the {self.watts:g} W cap"
        fitting = [m for m in modes if m.budget_w <= self.watts] or modes[:1]
        target = fitting[-1]
        if target.id == current.id:
            return None
        if target.budget_w > current.budget_w:
            if total_mw is not None and total_mw > self.watts * 1000 * self.headroom:
                return None
            return modes[i + 1], f"budget {modes[i + 1].budget_w:g} W fits the {self.watts:g} W cap"
        return target, f"budget {current.budget_w:g} W exceeds the {self.watts:g} W cap"


@dataclass
class ThermalGuard:
    """Step down before tj reaches its trip point, step back up once cool, with hysteresis and a hold time.

    It never steps above the mode it started in (the ceiling the user chose).
    """

    margin_c: float = 10.0  # step down at trip - margin
    hysteresis_c: float = 8.0  # step up at trip - margin - hysteresis
    hold_s: float = 10.0  # least time between changes
    trip_mc: int | None = None
    name: str = "thermal-guard"
    _last_change_s: float | None = None
    _ceiling: PowerMode | None = None

    def __post_init__(self):
        if self.margin_c < 0 or self.hysteresis_c <= 0:
            raise ConfigError("thermal-guard needs margin_c >= 0 and hysteresis_c > 0",
                              hint=f"got margin {self.margin_c}, hysteresis {self.hysteresis_c}")

    def thresholds_mc(self, platform=None) -> tuple[int, int]:
        trip = self.trip_mc or (platform.trip_point_mc("tj") if platform else None) or DEFAULT_TRIP_MC
        down = trip - round(self.margin_c * 1000)
        return down, down - round(self.hysteresis_c * 1000)

    def decide(self, snap: Snapshot, current: PowerMode, modes: list[PowerMode], platform=None):
        tj = snap.temps_mc.get("tj")
        if tj is None or tj <= -256000:
            return None
        down_at, up_at = self.thresholds_mc(platform)
        if self._ceiling is None:
            self._ceiling = current
        if self._last_change_s is not None and snap.time_s - self._last_change_s < self.hold_s:
            return None
        i = _index(modes, current)
        if tj >= down_at and i > 0:
            self._last_change_s = snap.time_s
            return modes[i - 1], f"tj {tj / 1000:.1f} C >= {down_at / 1000:.1f} C (trip - {self.margin_c:g} C)"
        below_ceiling = any(m.id == self._ceiling.id for m in modes[i + 1:])
        if tj <= up_at and below_ceiling:
            self._last_change_s = snap.time_s
            return modes[i + 1], f"tj {tj / 1000:.1f} C <= {up_at / 1000:.1f} C, cool again"
        return None


POLICIES = {"performance": Performance, "efficiency": Efficiency, "power-cap": PowerCap, "thermal-guard": ThermalGuard}


def make_policy(name: str, **options):
    if name not in POLICIES:
        raise ConfigError(f"unknown power policy {name!r}", hint=f"choose one of: {', '.join(POLICIES)}")
    if name == "power-cap" and options.get("watts") is None:
        raise ConfigError("the power-cap policy needs a cap", hint="pass --watts W (e.g. --watts 20)")
    kwargs = {k: v for k, v in options.items() if v is not None}
    if name != "power-cap":
        kwargs.pop("watts", None)
    return POLICIES[name](**kwargs)
