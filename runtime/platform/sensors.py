"""Hardware discovered once into {name: {field: path}} maps, then re-read each tick.

Rails: INA3221 hwmon (bus mV, mA; mW = mV x mA / 1000). Thermal: thermal_zoneN (m°C). GPU: load
(0-1000) and devfreq (Hz). CPU: online and cpufreq (kHz), /proc/stat for load. EMC: nvpmodel cap and
the bpmp rate when debugfs is readable (Hz). Fan: pwmfan pwm1 (0-255), pwm_tach rpm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .root import (CPU_DIR, EMC_ACTIVITY, EMC_CAP, EMC_RATE, GPU_DEVFREQ_PATHS, GPU_LOAD_PATHS, HWMON_GLOB,
                   INA3221_GLOB, THERMAL_GLOB, SysRoot)
from .snapshot import OFFLINE_MC


@dataclass
class Hardware:
    rails: dict[str, dict[str, Path]] = field(default_factory=dict)  # label -> {mv, ma}
    zones: dict[str, Path] = field(default_factory=dict)  # tegrastats name -> temp file
    trip_points: dict[str, list[int]] = field(default_factory=dict)  # zone -> [m°C]
    cpus: dict[int, Path] = field(default_factory=dict)  # cpu index -> cpuN dir
    gpu_load: Path | None = None
    gpu_devfreq: Path | None = None
    fan: dict[str, Path] = field(default_factory=dict)  # pwm, rpm
    missing: list[str] = field(default_factory=list)  # what was not found, for the one warning


def zone_name(zone_type: str) -> str:
    """thermal zone type -> tegrastats name: 'tj-thermal' -> 'tj'."""
    return zone_type.removesuffix("-thermal")


def discover(root: SysRoot) -> Hardware:
    hw = Hardware()
    for hwmon in root.glob(INA3221_GLOB):
        for label_file in sorted(hwmon.glob("in*_label"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)):
            k = re.sub(r"\D", "", label_file.name)
            label = root.read(label_file)
            if label and (hwmon / f"curr{k}_input").exists():
                hw.rails[label] = {"mv": hwmon / f"in{k}_input", "ma": hwmon / f"curr{k}_input"}
    if not hw.rails:
        hw.missing.append("no INA3221 power rails")
    for zone in root.glob(THERMAL_GLOB):
        ztype = root.read(zone / "type")
        if not ztype:
            continue
        name = zone_name(ztype)
        if root.read(zone / "temp") is None:
            hw.missing.append(f"thermal zone {ztype} unreadable")
            continue
        hw.zones[name] = zone / "temp"
        trips = sorted(zone.glob("trip_point_*_temp"), key=lambda p: int(re.sub(r"\D", "", p.name)))
        if trips:
            hw.trip_points[name] = [v for t in trips if (v := root.read_int(t)) is not None]
    if not hw.zones:
        hw.missing.append("no thermal zones")
    for cpu in root.glob(f"{CPU_DIR}/cpu[0-9]*"):
        hw.cpus[int(cpu.name[3:])] = cpu
    if not hw.cpus:
        hw.missing.append("no CPUs under /sys/devices/system/cpu")
    hw.gpu_load = next((p for rel in GPU_LOAD_PATHS if (p := root.path(rel)).exists()), None)
    hw.gpu_devfreq = next((p for rel in GPU_DEVFREQ_PATHS if (p := root.path(rel)).exists()), None)
    if hw.gpu_load is None and hw.gpu_devfreq is None:
        hw.missing.append("no GPU load or devfreq")
    for hwmon in root.glob(HWMON_GLOB):
        name = root.read(hwmon / "name")
        if name == "pwmfan" and (hwmon / "pwm1").exists():
            hw.fan["pwm"] = hwmon / "pwm1"
        elif name == "pwm_tach" and (hwmon / "rpm").exists():
            hw.fan["rpm"] = hwmon / "rpm"
    return hw


def read_rails(root: SysRoot, hw: Hardware) -> dict[str, tuple[int, int, int]]:
    """label -> (mW, mV, mA); a rail that fails to read this tick is left out."""
    out = {}
    for label, files in hw.rails.items():
        mv, ma = root.read_int(files["mv"]), root.read_int(files["ma"])
        if mv is not None and ma is not None:
            out[label] = (mv * ma // 1000, mv, ma)
    return out


def read_temps(root: SysRoot, hw: Hardware) -> dict[str, int]:
    """tegrastats name -> m°C (OFFLINE_MC for an offline sensor; a failed read is left out)."""
    out = {}
    for name, path in hw.zones.items():
        v = root.read_int(path)
        if v is not None:
            out[name] = max(v, OFFLINE_MC)
    return out


def read_proc_stat(root: SysRoot) -> dict[int, tuple[int, int]]:
    """cpu index -> (busy jiffies, total jiffies)."""
    out = {}
    for line in (root.read("proc/stat") or "").splitlines():
        m = re.match(r"^cpu(\d+)\s+(.*)$", line)
        if m:
            vals = [int(v) for v in m[2].split()]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            out[int(m[1])] = (sum(vals) - idle, sum(vals))
    return out


def read_cpus(root: SysRoot, hw: Hardware) -> dict[int, tuple[bool, int, str | None]]:
    """cpu index -> (online, cur kHz, governor); cpu0 has no online file and is always online."""
    out = {}
    for idx, d in hw.cpus.items():
        online = root.read_int(d / "online")
        online = True if online is None else online == 1
        out[idx] = (online, root.read_int(d / "cpufreq/scaling_cur_freq") or 0, root.read(d / "cpufreq/scaling_governor"))
    return out


def read_gpu(root: SysRoot, hw: Hardware) -> tuple[int | None, int | None]:
    """(load permille 0-1000, cur Hz)."""
    load = root.read_int(hw.gpu_load) if hw.gpu_load else None
    freq = root.read_int(hw.gpu_devfreq / "cur_freq") if hw.gpu_devfreq else None
    return load, freq


def read_emc(root: SysRoot) -> tuple[int | None, int | None]:
    """(load %, Hz): rate from bpmp debugfs when readable, else the nvpmodel cap."""
    rate = root.read_int(EMC_RATE) or root.read_int(EMC_CAP)
    activity = root.read_int(EMC_ACTIVITY)  # kHz-weighted activity, as actmon reports it
    load = None
    if rate and activity is not None:
        load = min(100, round(activity * 100 / (rate / 1000)))
    return load, rate


def read_lfb(root: SysRoot) -> tuple[int | None, int | None]:
    """Largest free block (count, MB) from /proc/buddyinfo, 4 KiB pages."""
    best: tuple[int, int] | None = None
    for line in (root.read("proc/buddyinfo") or "").splitlines():
        counts = [int(v) for v in line.split()[4:] if v.isdigit()]
        for order in range(len(counts) - 1, -1, -1):
            if counts[order]:
                if best is None or order > best[0]:
                    best = (order, counts[order])
                elif order == best[0]:
                    best = (order, best[1] + counts[order])
                break
    if best is None:
        return None, None
    return best[1], max(1, (4 << best[0]) // 1024)
