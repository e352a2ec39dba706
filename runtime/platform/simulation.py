"""The emulated board's physics: rails, temperatures, GPU load and clocks from a real workload.

``step(state, dt, load, caps, model)`` is a pure function: clocks follow load up to the mode's caps,
rail power rises with load and clock (P ~ f^2), the junction temperature follows power with a first-order
thermal time constant. ``Simulation`` runs it in its own process on a timer, reading the caps from the
tree (so an nvpmodel switch takes effect on the next tick) and the load from a watched process.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ...boards import Board
from ...errors import ConfigError, PlatformError
from .board import read_board
from .meminfo import parse_meminfo, render_meminfo
from .root import CPU_DIR, EMC_ACTIVITY, EMC_CAP, EMC_RATE, GPU_DEVFREQ, GPU_DEVICE, SysRoot, tegra234_data

TJ_MAX_MC = 105000  # hardware shutdown region; the model never goes past it


@dataclass(frozen=True)
class Caps:
    cores_online: int
    cpu_min_khz: int
    cpu_max_khz: int
    gpu_min_hz: int
    gpu_max_hz: int
    emc_max_hz: int


@dataclass(frozen=True)
class BoardModel:
    cores: int
    cpu_top_khz: int
    gpu_top_hz: int
    emc_top_hz: int
    rails_mv: dict
    rails_mw: dict  # label -> {idle, cpu, gpu} mW at full load and top clocks
    total_rails: tuple[str, ...]
    ambient_mc: int
    c_per_w: float  # steady-state °C above ambient per W
    tau_s: float  # thermal time constant

    @classmethod
    def of(cls, board: Board) -> "BoardModel":
        d = tegra234_data()
        bd = d["boards"][board.name]
        return cls(cores=board.cpu["cores"], cpu_top_khz=round(board.cpu["max_mhz"] * 1000),
                   gpu_top_hz=round(board.gpu["max_mhz"] * 1_000_000), emc_top_hz=round(board.emc_max_mhz * 1_000_000),
                   rails_mv=bd["rails_mv"], rails_mw=bd["rails_model_mw"], total_rails=tuple(bd["total_rails"]),
                   ambient_mc=d["ambient_mc"], c_per_w=bd["thermal_c_per_w"], tau_s=bd["thermal_tau_s"])


@dataclass(frozen=True)
class SimState:
    tj_mc: float
    load: float = 0.0  # 0-1, the workload's share of the online cores (drives CPU and GPU)
    cpu_khz: int = 0
    gpu_hz: int = 0
    rails_mw: tuple[tuple[str, int], ...] = ()

    @property
    def total_mw(self) -> int:
        return sum(mw for _name, mw in self.rails_mw)


def step(state: SimState, dt: float, load: float, caps: Caps, model: BoardModel) -> SimState:
    """Advance the board by dt seconds under a workload load (0-1) and the mode's caps."""
    load = min(1.0, max(0.0, load))
    demand = min(1.0, load * 1.25)  # governors run ahead of utilisation
    cpu_khz = round(caps.cpu_min_khz + (caps.cpu_max_khz - caps.cpu_min_khz) * demand)
    gpu_hz = round(caps.gpu_min_hz + (caps.gpu_max_hz - caps.gpu_min_hz) * demand)
    cpu_scale = load * caps.cores_online / model.cores * (cpu_khz / model.cpu_top_khz) ** 2
    gpu_scale = load * (gpu_hz / model.gpu_top_hz) ** 2 * (0.6 + 0.4 * caps.emc_max_hz / model.emc_top_hz)
    rails = tuple((name, round(m["idle"] + m["cpu"] * cpu_scale + m["gpu"] * gpu_scale)) for name, m in model.rails_mw.items())
    total_w = sum(mw for name, mw in rails if name in model.total_rails) / 1000
    tj_ss = model.ambient_mc + model.c_per_w * total_w * 1000
    tj = tj_ss + (state.tj_mc - tj_ss) * math.exp(-dt / model.tau_s)
    tj = min(TJ_MAX_MC, max(model.ambient_mc, tj))
    return SimState(tj_mc=tj, load=load, cpu_khz=cpu_khz, gpu_hz=gpu_hz, rails_mw=rails)


def read_caps(root: SysRoot, model: BoardModel) -> Caps:
    """The caps the current mode (and jetson_clocks) left in the tree."""
    online = sum(1 for c in root.glob(f"{CPU_DIR}/cpu[0-9]*") if root.read_int(c / "online") in (None, 1))
    pol = root.path(f"{CPU_DIR}/cpufreq/policy0")
    gpu = root.path(GPU_DEVFREQ)
    emc = root.read_int(EMC_CAP) or model.emc_top_hz
    return Caps(cores_online=online,
                cpu_min_khz=root.read_int(pol / "scaling_min_freq") or 0,
                cpu_max_khz=root.read_int(pol / "scaling_max_freq") or model.cpu_top_khz,
                gpu_min_hz=root.read_int(gpu / "min_freq") or 0,
                gpu_max_hz=root.read_int(gpu / "max_freq") or model.gpu_top_hz,
                emc_max_hz=min(emc, model.emc_top_hz))


def read_state(root: SysRoot) -> SimState:
    for zone in root.glob("sys/class/thermal/thermal_zone*"):
        if root.read(zone / "type") == "tj-thermal":
            return SimState(tj_mc=float(root.read_int(zone / "temp") or tegra234_data()["ambient_mc"]))
    return SimState(tj_mc=float(tegra234_data()["ambient_mc"]))


def write_state(root: SysRoot, state: SimState, caps: Caps, model: BoardModel, dt: float, rss_kb: int = 0) -> None:
    data = tegra234_data()
    for hwmon in root.glob("sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"):
        for label_file in hwmon.glob("in*_label"):
            label, k = root.read(label_file), label_file.name[2:-6]
            mw = dict(state.rails_mw).get(label)
            if mw is not None:
                mv = model.rails_mv[label]
                root.write(hwmon / f"in{k}_input", mv)
                root.write(hwmon / f"curr{k}_input", round(mw * 1000 / mv))
    for zone in root.glob("sys/class/thermal/thermal_zone*"):
        ztype = root.read(zone / "type")
        if ztype in data["zone_offsets_mc"] and ztype not in data["offline_zones"]:
            root.write(zone / "temp", round(state.tj_mc) + data["zone_offsets_mc"][ztype])
    root.write(f"{GPU_DEVICE}/load", round(state.load * 1000))
    root.write(root.path(GPU_DEVFREQ) / "cur_freq", state.gpu_hz)
    for pol in root.glob(f"{CPU_DIR}/cpufreq/policy*"):
        root.write(pol / "scaling_cur_freq", state.cpu_khz)
    root.write(EMC_RATE, caps.emc_max_hz)
    root.write(EMC_ACTIVITY, round(caps.emc_max_hz / 1000 * min(1.0, 0.03 + 0.6 * state.load)))
    _advance_proc_stat(root, state.load, dt)
    for hw in root.glob("sys/class/hwmon/hwmon*"):
        name = root.read(hw / "name")
        if name == "pwmfan":
            pwm = min(255, max(0, round((state.tj_mc - 45000) / 40000 * 255)))
            if root.read_int(hw / "pwm1") != 255:  # jetson_clocks pins the fan at full speed
                root.write(hw / "pwm1", pwm)
        elif name == "pwm_tach":
            root.write(hw / "rpm", round(max(0, state.tj_mc - 45000) / 40000 * 5000))
    _update_meminfo(root, rss_kb)


def _advance_proc_stat(root: SysRoot, load: float, dt: float) -> None:
    """Add dt of jiffies (USER_HZ 100) to each online CPU, `load` of them busy."""
    lines = [ln.split() for ln in (root.read("proc/stat") or "").splitlines()]
    total = None
    for parts in lines:
        if parts and parts[0].startswith("cpu") and parts[0] != "cpu":
            vals = [int(v) for v in parts[1:]]
            if root.read_int(f"{CPU_DIR}/{parts[0]}/online") in (None, 1):
                vals[0] += round(100 * dt * load)
                vals[3] += round(100 * dt * (1 - load))
                parts[1:] = map(str, vals)
            total = vals if total is None else [a + b for a, b in zip(total, vals)]
    for parts in lines:
        if parts and parts[0] == "cpu" and total is not None:
            parts[1:] = map(str, total)
    root.write("proc/stat", "\n".join(" ".join(p) for p in lines))


def _update_meminfo(root: SysRoot, rss_kb: int) -> None:
    """The watched process's memory comes out of MemFree (unified memory: CPU and GPU share it)."""
    base = root.path("proc/.meminfo.base")
    if not base.exists():
        base.write_text(root.read("proc/meminfo") or "")
    fields = parse_meminfo(base.read_text())
    if "MemFree" in fields:
        fields["MemFree"] = max(0, fields["MemFree"] - rss_kb)
        fields["MemAvailable"] = max(0, fields.get("MemAvailable", 0) - rss_kb)
    root.write("proc/meminfo", render_meminfo(fields).rstrip("\n"))


def run(root_dir: str, pid: int | None, interval: float, seconds: float | None = None) -> None:
    """The simulation loop (the body of the separate process)."""
    import psutil

    root = SysRoot(root_dir)
    board = read_board(root).profile
    if board is None:
        raise PlatformError(f"{root_dir} is not an emulated board root", hint="create one with: edge-sdk emulate BOARD --root DIR")
    model = BoardModel.of(board)
    proc = psutil.Process(pid) if pid else None
    if proc:
        proc.cpu_percent(None)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    state, last, t0 = read_state(root), time.monotonic(), time.monotonic()
    while not stop and (seconds is None or time.monotonic() - t0 < seconds):
        time.sleep(interval)
        now = time.monotonic()
        caps = read_caps(root, model)
        load, rss_kb = 0.0, 0
        if proc is not None:
            try:
                with proc.oneshot():
                    pct, rss_kb = proc.cpu_percent(None), proc.memory_info().rss // 1024
            except psutil.NoSuchProcess:
                break
            load = pct / 100 / max(1, min(os.cpu_count() or 1, caps.cores_online))
        state = step(state, now - last, load, caps, model)
        write_state(root, state, caps, model, now - last, rss_kb)
        last = now


class Simulation:
    """Start and stop the simulation process for an emulated root (also a context manager)."""

    def __init__(self, root: str | os.PathLike, watch_pid: int | None = None, interval_s: float = 0.5):
        if not 0.01 <= interval_s <= 60:
            raise ConfigError(f"simulation interval {interval_s} s out of range", hint="use 0.01 to 60 seconds")
        self.root = Path(root)
        self.watch_pid = os.getpid() if watch_pid is None else watch_pid
        self.interval_s = interval_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Simulation":
        if self.proc is None:
            cmd = [sys.executable, "-m", "edge_sdk.runtime.platform.simulation", "--root", str(self.root),
                   "--pid", str(self.watch_pid), "--interval", str(self.interval_s)]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "Simulation":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="edge-sdk board simulation over an emulated root")
    p.add_argument("--root", required=True)
    p.add_argument("--pid", type=int, default=0, help="process whose CPU load is the workload (0: idle)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between ticks")
    p.add_argument("--seconds", type=float, default=None)
    a = p.parse_args()
    run(a.root, a.pid or None, a.interval, a.seconds)
