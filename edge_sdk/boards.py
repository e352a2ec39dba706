"""Jetson board profiles, loaded from ``edge_sdk/data/boards.json`` (data, not code)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from .errors import PowerModeError, UnknownBoardError


@dataclass(frozen=True)
class PowerMode:
    id: int
    name: str
    cores_online: int
    cpu_max_mhz: float | None  # None = no cap (board maximum)
    gpu_max_mhz: float | None
    emc_max_mhz: float | None
    tpc_pg_mask: int | None
    budget_w: float
    default: bool = False


@dataclass(frozen=True)
class Storage:
    kind: str  # emmc | nvme | ufs | sd
    read_mbps: float  # sequential read, MB/s
    rand4k_iops: float


@dataclass(frozen=True)
class Board:
    name: str
    title: str
    module: str
    dt_model: str
    dt_compatible: tuple[str, ...]
    memory_gb: int
    mem_total_mb: int  # MemTotal as the kernel reports it
    memory_bus_bits: int
    bandwidth_gbps: float  # peak DRAM bandwidth at emc_max_mhz, GB/s
    emc_max_mhz: float
    emc_steps_mhz: tuple[float, ...]
    cpu: dict
    gpu: dict
    power_w: tuple[float, float]
    rails: dict
    storage: dict[str, Storage]
    default_storage: str
    power_modes: tuple[PowerMode, ...]
    reboot_rule: str
    unverified: tuple[str, ...] = field(default_factory=tuple)

    @property
    def default_mode(self) -> PowerMode:
        return next(m for m in self.power_modes if m.default)

    def mode(self, key: int | str | None) -> PowerMode:
        """A power mode by id or name; None gives the default mode."""
        if key is None:
            return self.default_mode
        for m in self.power_modes:
            if str(m.id) == str(key) or m.name.lower() == str(key).lower():
                return m
        valid = ", ".join(f"{m.id}={m.name}" for m in self.power_modes)
        raise PowerModeError(f"board {self.name} has no power mode {key!r}", hint=f"valid modes: {valid}")

    def mode_bandwidth_gbps(self, mode: PowerMode) -> float:
        """DRAM bandwidth under a mode's EMC cap (bandwidth scales with the EMC clock)."""
        emc = mode.emc_max_mhz or self.emc_max_mhz
        return self.bandwidth_gbps * min(emc, self.emc_max_mhz) / self.emc_max_mhz

    def mode_gpu_mhz(self, mode: PowerMode) -> float:
        return min(mode.gpu_max_mhz or self.gpu["max_mhz"], self.gpu["max_mhz"])

    def mode_fp16_tflops(self, mode: PowerMode) -> float:
        return self.gpu["fp16_dense_tflops"] * self.mode_gpu_mhz(mode) / self.gpu["max_mhz"]

    def needs_reboot(self, old: PowerMode, new: PowerMode) -> bool:
        """Switching changes online cores or the TPC mask (unverified rule, see boards.json)."""
        return old.cores_online != new.cores_online or (old.tpc_pg_mask or 0) != (new.tpc_pg_mask or 0)


@lru_cache(maxsize=1)
def _raw() -> dict:
    text = resources.files("edge_sdk.data").joinpath("boards.json").read_text()
    return json.loads(text)["boards"]


def board_names() -> list[str]:
    return list(_raw())


def get_board(name: str) -> Board:
    raw = _raw()
    if name not in raw:
        raise UnknownBoardError(f"unknown board {name!r}", hint=f"choose one of: {', '.join(raw)}")
    d = dict(raw[name])
    return Board(
        name=name,
        title=d["title"],
        module=d["module"],
        dt_model=d["dt_model"],
        dt_compatible=tuple(d["dt_compatible"]),
        memory_gb=d["memory_gb"],
        mem_total_mb=d["mem_total_mb"],
        memory_bus_bits=d["memory_bus_bits"],
        bandwidth_gbps=d["bandwidth_gbps"],
        emc_max_mhz=d["emc_max_mhz"],
        emc_steps_mhz=tuple(d["emc_steps_mhz"]),
        cpu=d["cpu"],
        gpu=d["gpu"],
        power_w=tuple(d["power_w"]),
        rails=d["rails"],
        storage={
            k: Storage(kind=k, read_mbps=v["read_mbps"], rand4k_iops=v["rand4k_iops"]) for k, v in d["storage"].items()
        },
        default_storage=d["default_storage"],
        power_modes=tuple(PowerMode(**m) for m in d["power_modes"]),
        reboot_rule=d["reboot_rule"],
        unverified=tuple(d.get("unverified", ())),
    )


def all_boards() -> list[Board]:
    return [get_board(n) for n in board_names()]
