"""`Platform(root)`: the board seen through one root directory."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ...errors import PlatformError
from . import sensors
from .board import BoardInfo, read_board
from .meminfo import MemInfo, parse_meminfo
from .root import EMULATED_MARKER, SysRoot, tegra234_data
from .snapshot import CpuCore, Rail, Snapshot, input_power_mw

log = logging.getLogger("edge_sdk.platform")


class Platform:
    """Readings and commands of one board. Hardware is discovered on first use, re-read each snapshot."""

    def __init__(self, root: str | os.PathLike = "/"):
        self.sys = SysRoot(root)
        self._hw: sensors.Hardware | None = None
        self._board: BoardInfo | None = None
        self._stat_prev: dict[int, tuple[int, int]] = {}
        self._rail_sum: dict[str, tuple[int, int]] = {}  # label -> (sum mW, count)

    @property
    def root(self) -> Path:
        return self.sys.root

    def __repr__(self) -> str:
        return f"Platform({str(self.root)!r})"

    @classmethod
    def from_options(cls, emulate: str | None = None, root: str | os.PathLike | None = None) -> "Platform":
        """What --emulate BOARD / --root DIR point at (the CLI reads EDGE_SDK_EMULATE / EDGE_SDK_ROOT)."""
        emulate = emulate or None
        root = root or None
        if emulate:
            from .emulator import emulated_root

            return cls(emulated_root(emulate, root))
        return cls(root or "/")

    @property
    def emulated(self) -> bool:
        """The root is an emulated board laid out on a host (its GPU software is the host's)."""
        return self.sys.path(EMULATED_MARKER).is_file()

    def run(self, args: list[str], **kw):
        return self.sys.run(args, **kw)

    @property
    def hardware(self) -> sensors.Hardware:
        if self._hw is None:
            self._hw = sensors.discover(self.sys)
            if self._hw.missing:
                log.warning("%s: %s; those readings are left out", self.root, "; ".join(self._hw.missing))
        return self._hw

    def board(self) -> BoardInfo:
        if self._board is None:
            self._board = read_board(self.sys)
        return self._board

    def meminfo(self) -> MemInfo:
        text = self.sys.read("proc/meminfo")
        if text is None:
            raise PlatformError(f"cannot read {self.sys.path('proc/meminfo')}", hint="pass --root with a board root or --emulate BOARD")
        return MemInfo(parse_meminfo(text))

    def allocatable_gpu_bytes(self) -> int:
        return self.meminfo().allocatable_gpu_bytes

    def total_rails(self) -> list[str] | None:
        """Rails that add up to the board's input power (VDD_IN where present)."""
        board = self.board()
        if board.name:
            return tegra234_data()["boards"][board.name]["total_rails"]
        return None

    def trip_point_mc(self, zone: str = "tj") -> int | None:
        """The lowest trip point of a zone (m°C): where the kernel starts throttling."""
        trips = self.hardware.trip_points.get(zone)
        return min(trips) if trips else None

    def snapshot(self) -> Snapshot:
        hw = self.hardware
        try:
            mem = self.meminfo()
        except PlatformError:
            if "no /proc/meminfo" not in hw.missing:
                hw.missing.append("no /proc/meminfo")
                log.warning("%s: no readable /proc/meminfo; memory readings are left out", self.root)
            mem = MemInfo({})
        s = Snapshot(stamp=time.strftime("%m-%d-%Y %H:%M:%S"), time_s=time.monotonic(),
                     ram_used_mb=mem.ram_used_mb, ram_total_mb=mem.total_kb // 1024,
                     swap_used_mb=mem.swap_used_mb, swap_total_mb=mem.kb("SwapTotal") // 1024,
                     swap_cached_mb=mem.kb("SwapCached") // 1024)
        s.lfb_blocks, s.lfb_block_mb = sensors.read_lfb(self.sys)
        stat = sensors.read_proc_stat(self.sys)
        for idx, (online, khz, _gov) in sorted(sensors.read_cpus(self.sys, hw).items()):
            busy, total = stat.get(idx, (0, 0))
            pbusy, ptotal = self._stat_prev.get(idx, (0, 0))
            load = round(100 * (busy - pbusy) / (total - ptotal)) if total > ptotal else 0
            s.cpus.append(CpuCore(online=online, load_pct=load if online else 0, mhz=khz // 1000 if online else 0))
        self._stat_prev = stat
        s.emc_load_pct, emc_hz = sensors.read_emc(self.sys)
        if not emc_hz and self.board().profile:  # cap 0 = uncapped: the board's top EMC clock
            emc_hz = round(self.board().profile.emc_max_mhz * 1_000_000)
            s.emc_load_pct = s.emc_load_pct or 0
        s.emc_mhz = emc_hz // 1_000_000 if emc_hz else None
        gpu_load, gpu_hz = sensors.read_gpu(self.sys, hw)
        if gpu_load is not None or gpu_hz is not None:
            s.gpu_load_pct = round((gpu_load or 0) / 10)
            s.gpu_mhz = [(gpu_hz or 0) // 1_000_000]
        s.temps_mc = sensors.read_temps(self.sys, hw)
        for label, (mw, mv, ma) in sensors.read_rails(self.sys, hw).items():
            total, n = self._rail_sum.get(label, (0, 0))
            self._rail_sum[label] = (total + mw, n + 1)
            s.rails[label] = Rail(mw=mw, avg_mw=(total + mw) // (n + 1), mv=mv, ma=ma)
        if "pwm" in hw.fan:
            s.fan_pwm = self.sys.read_int(hw.fan["pwm"])
        if "rpm" in hw.fan:
            s.fan_rpm = self.sys.read_int(hw.fan["rpm"])
        return s

    def power_mw(self) -> int | None:
        """Board input power now (mW), reading only the rails (cheap enough for a sampling thread)."""
        rails = sensors.read_rails(self.sys, self.hardware)
        mw = {n: v[0] for n, v in rails.items()}
        return input_power_mw(mw, None if not mw or "VDD_IN" in mw else self.total_rails())

    def cpu_governors(self) -> dict[int, str | None]:
        return {i: gov for i, (online, _khz, gov) in sensors.read_cpus(self.sys, self.hardware).items() if online}
