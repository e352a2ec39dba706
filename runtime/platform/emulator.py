"""Lay out an emulated board root: the r36 /sys, /proc, /etc, /var tree and fake tools in ROOT/bin."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from ...boards import Board, get_board
from ...errors import PlatformError
from ...paths import cache_dir
from .meminfo import render_meminfo
from .nvpmodel_conf import apply_model, freq_table, parse_conf, render_conf
from .root import (CPU_DIR, CUDA_VERSION, DT_COMPATIBLE, DT_MODEL, EMC_ACTIVITY, EMC_CAP, EMULATED_MARKER, GPU_DEVFREQ, GPU_DEVICE,
                   NVPMODEL_CONF, NVPMODEL_STATUS, TEGRA_RELEASE, SysRoot, tegra234_data)

MARKER = EMULATED_MARKER
TOOLS = ("nvpmodel", "jetson_clocks", "tegrastats")


def default_root(board: str, cache: str | os.PathLike) -> Path:
    """The board's root when --root is not given: one per user cache (edge_sdk.paths.cache_dir). Its
    power mode and clocks live in it, so jobs that must not share a board pass their own --root."""
    return Path(cache) / "emulated" / board


def emulated_root(board: str, root: str | os.PathLike | None = None) -> Path:
    """Create (or reuse) an emulated root for a board; returns its path. Without `root`, the user's
    default_root (for Python callers; the CLI passes the root it resolved)."""
    profile = get_board(board)
    path = Path(root) if root else default_root(board, cache_dir())
    marker = path / MARKER
    if marker.exists():
        have = json.loads(marker.read_text()).get("board")
        if have != board:
            raise PlatformError(f"{path} already holds an emulated {have}, not {board}",
                                hint="pick another --root or remove that directory")
        _install_tools(path)  # keeps the shebang pointing at the current interpreter
        return path
    if path.exists() and any(path.iterdir()):
        raise PlatformError(f"{path} is not empty and is not an emulated root", hint="pass an empty or new directory as --root")
    # lay out beside the target and rename: a concurrent caller sees either nothing or a whole root
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        layout(profile, staging)
        os.rename(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if marker.exists():
            return emulated_root(board, path)
        raise
    return path


def layout(board: Board, path: Path) -> None:
    data = tegra234_data()
    bd = data["boards"][board.name]
    r = SysRoot(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_bytes(r, DT_MODEL, board.dt_model.encode() + b"\0")
    _write_bytes(r, DT_COMPATIBLE, b"".join(c.encode() + b"\0" for c in board.dt_compatible))
    r.write(TEGRA_RELEASE, data["l4t_release"])
    r.write(CUDA_VERSION, json.dumps({"cuda": {"name": "CUDA SDK", "version": data["cuda_version"]}}))
    _layout_cpus(r, board)
    _layout_gpu(r, board)
    _layout_rails(r, board, bd)
    _layout_thermal(r, data)
    _layout_fan(r, len(board.rails))
    r.write(EMC_CAP, round(board.emc_max_mhz * 1_000_000))
    r.write(EMC_ACTIVITY, 0)
    _layout_memory(r, board)
    conf_text = render_conf(board)
    r.write(NVPMODEL_CONF, conf_text.rstrip("\n"))
    conf = parse_conf(conf_text)
    r.write(NVPMODEL_STATUS, f"pmode:{board.default_mode.id:04d}")
    apply_model(r, conf, conf.model(board.default_mode.id))
    _install_tools(path)
    (path / MARKER).write_text(json.dumps({"board": board.name}) + "\n")


def _write_bytes(r: SysRoot, rel: str, data: bytes) -> None:
    p = r.path(rel)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def _layout_cpus(r: SysRoot, board: Board) -> None:
    table = freq_table(board, "cpu")
    n = board.cpu["cores"]
    r.write(f"{CPU_DIR}/online", f"0-{n - 1}")
    r.write(f"{CPU_DIR}/present", f"0-{n - 1}")
    for first, last in board.cpu["clusters"]:
        pol = f"{CPU_DIR}/cpufreq/policy{first}"
        r.write(f"{pol}/scaling_available_frequencies", " ".join(map(str, table)))
        r.write(f"{pol}/cpuinfo_max_freq", table[-1])
        r.write(f"{pol}/cpuinfo_min_freq", table[0])
        r.write(f"{pol}/scaling_max_freq", table[-1])
        r.write(f"{pol}/scaling_min_freq", board.cpu["min_khz"])
        r.write(f"{pol}/scaling_cur_freq", board.cpu["min_khz"])
        r.write(f"{pol}/scaling_governor", "schedutil")
        r.write(f"{pol}/scaling_available_governors", "conservative ondemand userspace powersave performance schedutil")
        for i in range(first, last + 1):
            d = r.path(f"{CPU_DIR}/cpu{i}")
            d.mkdir(parents=True, exist_ok=True)
            if i:
                r.write(f"{CPU_DIR}/cpu{i}/online", 1)
            (d / "cpufreq").symlink_to(f"../cpufreq/policy{first}")
    stat_lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in range(n)]
    r.write("proc/stat", "\n".join(stat_lines))


def _layout_gpu(r: SysRoot, board: Board) -> None:
    table = freq_table(board, "gpu")
    df = f"{GPU_DEVICE}/devfreq/17000000.gpu"
    r.write(f"{GPU_DEVICE}/load", 0)
    r.write(f"{GPU_DEVICE}/tpc_pg_mask", 0)
    r.write(f"{df}/available_frequencies", " ".join(map(str, table)))
    r.write(f"{df}/min_freq", table[0])
    r.write(f"{df}/max_freq", table[-1])
    r.write(f"{df}/cur_freq", table[0])
    r.write(f"{df}/governor", "nvhost_podgov")
    link = r.path(GPU_DEVFREQ)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(r.path(df), link.parent))


def _layout_rails(r: SysRoot, board: Board, bd: dict) -> None:
    for n, (addr, labels) in enumerate(board.rails.items(), start=1):
        hw = f"sys/bus/i2c/drivers/ina3221/{addr}/hwmon/hwmon{n}"
        r.write(f"{hw}/name", "ina3221")
        for k, label in enumerate(labels, start=1):
            if label is None:
                continue
            model = bd["rails_model_mw"][label]
            mv = bd["rails_mv"][label]
            r.write(f"{hw}/in{k}_label", label)
            r.write(f"{hw}/in{k}_input", mv)
            r.write(f"{hw}/curr{k}_input", round(model["idle"] * 1000 / mv))
            r.write(f"{hw}/curr{k}_max", 8000)
            r.write(f"{hw}/curr{k}_crit", 10000)


def _layout_thermal(r: SysRoot, data: dict) -> None:
    tj = data["ambient_mc"] + 8000
    for n, ztype in enumerate(data["thermal_zones"]):
        z = f"sys/class/thermal/thermal_zone{n}"
        r.write(f"{z}/type", ztype)
        if ztype in data["unreadable_zones"]:
            _write_bytes(r, f"{z}/temp", b"")  # reads fail (EAGAIN) on these zones
        elif ztype in data["offline_zones"]:
            r.write(f"{z}/temp", -256000)
        else:
            r.write(f"{z}/temp", tj + data["zone_offsets_mc"].get(ztype, 0))
        if ztype == "tj-thermal":
            for k, (mc, kind) in enumerate(data["tj_trip_points_mc"]):
                r.write(f"{z}/trip_point_{k}_temp", mc)
                r.write(f"{z}/trip_point_{k}_type", kind)


def _layout_fan(r: SysRoot, first: int) -> None:
    r.write(f"sys/class/hwmon/hwmon{first + 1}/name", "pwmfan")
    r.write(f"sys/class/hwmon/hwmon{first + 1}/pwm1", 0)
    r.write(f"sys/class/hwmon/hwmon{first + 2}/name", "pwm_tach")
    r.write(f"sys/class/hwmon/hwmon{first + 2}/rpm", 0)


def base_meminfo(board: Board) -> dict[str, int]:
    """An idle board's /proc/meminfo (kB): MemTotal from the profile, zram swap of MemTotal / 2."""
    total = board.mem_total_mb * 1024
    return {"MemTotal": total, "MemFree": total * 80 // 100, "MemAvailable": total * 90 // 100,
            "Buffers": 40960, "Cached": total * 8 // 100, "SwapCached": 0, "SwapTotal": total // 2,
            "SwapFree": total // 2, "NvMapMemFree": 0, "NvMapMemUsed": 131072, "CmaTotal": 0, "CmaFree": 0}


def _layout_memory(r: SysRoot, board: Board) -> None:
    fields = base_meminfo(board)
    r.write("proc/meminfo", render_meminfo(fields).rstrip("\n"))
    r.write("proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
            + "\n".join(f"/dev/zram{i}\t\t\t\tpartition\t{fields['SwapTotal'] // 4}\t\t0\t\t5" for i in range(4)))
    free_4mb = fields["MemFree"] // 4096 // 4
    r.write("proc/buddyinfo", f"Node 0, zone      DMA      1 1 1 1 1 1 1 1 1 1 100\n"
                              f"Node 0, zone   Normal     10 10 10 10 10 10 10 10 10 10 {free_4mb}")


def _install_tools(path: Path) -> None:
    bin_dir = path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        p = bin_dir / tool
        text = (f"#!{sys.executable}\nimport sys\nfrom edge_sdk.runtime.platform.fake_tools import main\n"
                f"sys.exit(main({tool!r}, __file__, sys.argv[1:]))\n")
        if p.exists() and p.read_text() == text:
            continue
        tmp = p.with_name(f".{tool}.{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755 | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(tmp, p)  # a tool running now keeps its old file
