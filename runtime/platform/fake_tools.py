"""The emulator's `nvpmodel`, `jetson_clocks` and `tegrastats`: the real CLIs and output formats over a root.

Each script in ROOT/bin calls ``main(tool, __file__, argv)``; the root is the script's parent's parent.
"""

from __future__ import annotations

import argparse
import fcntl
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .board import read_board
from .nvpmodel_conf import NvpConf, PowerModel, apply_model, parse_conf
from .root import CPU_DIR, EMC_CAP, GPU_DEVFREQ, NVPMODEL_CONF, NVPMODEL_STATUS, SysRoot


LOCK = ".edge-sdk-emulated.lock"


def main(tool: str, script: str, argv: list[str]) -> int:
    root = SysRoot(Path(script).resolve().parent.parent)
    if tool == "tegrastats":
        return tegrastats(root, argv)
    with locked(root):
        return {"nvpmodel": nvpmodel, "jetson_clocks": jetson_clocks}[tool](root, argv)


@contextmanager
def locked(root: SysRoot):
    """One nvpmodel / jetson_clocks at a time per root: jobs sharing an emulated board see whole
    mode changes (read the status, apply the caps, write the status), never a mix of two."""
    with open(root.path(LOCK), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# -- nvpmodel ---------------------------------------------------------------------------------------

def read_status(root: SysRoot) -> int | None:
    text = root.read(NVPMODEL_STATUS) or ""
    for part in text.split():
        if part.startswith("pmode:"):
            return int(part[6:])
    return None


def needs_reboot(root: SysRoot, old: PowerModel, new: PowerModel) -> bool:
    """Board data decides (boards.json reboot_rule); unknown boards use the same rule on the conf."""
    profile = read_board(root).profile
    if profile is not None:
        ids = {m.id for m in profile.power_modes}
        if old.id in ids and new.id in ids:
            return profile.needs_reboot(profile.mode(old.id), profile.mode(new.id))
    return old.cores_online != new.cores_online or (old.tpc_pg_mask or 0) != (new.tpc_pg_mask or 0)


def nvpmodel(root: SysRoot, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nvpmodel", add_help=True)
    p.add_argument("-m", dest="mode", type=int)
    p.add_argument("-q", dest="query", action="store_true")
    p.add_argument("-p", dest="print_", action="store_true")
    p.add_argument("-f", dest="conf")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    conf_rel = args.conf or f"/{NVPMODEL_CONF}"
    text = root.read(conf_rel)
    if text is None:
        print(f"NVPM ERROR: failed to open config file: {conf_rel}", file=sys.stderr)
        return 1
    conf = parse_conf(text)
    verbose = args.verbose
    if verbose:
        print(f"NVPM VERB: Config file: {conf_rel}")
        print(f"NVPM VERB: parsing done for {conf_rel}")
    current_id = read_status(root)
    if current_id is None:
        current_id = conf.default_id if conf.default_id is not None else conf.models[0].id
    current = conf.model(current_id)
    if args.mode is not None:
        return _set_mode(root, conf, current, args.mode, verbose)
    if args.print_:
        for model in conf.models:
            print(f"NVPM VERB: POWER_MODEL: ID={model.id} NAME={model.name}")
            if verbose:
                for param, arg, value in model.settings:
                    knob = conf.params[param].knobs.get(arg, "")
                    real = root.read(knob) if knob else None
                    real = "1" if real is None and knob.endswith("cpu0/online") else real
                    print(f"NVPM VERB: PARAM {param}: ARG {arg}: PATH {knob}: REAL_VAL: {real} CONF_VAL: {value}")
    if args.query or not args.print_:
        if verbose:
            print(f"NVPM VERB: Current mode: NV Power Mode: {current.name}")
        print(f"NV Power Mode: {current.name}")
        print(current.id)
    return 0


def _set_mode(root: SysRoot, conf: NvpConf, current: PowerModel, mode_id: int, verbose: bool) -> int:
    ids = [m.id for m in conf.models]
    if mode_id not in ids:
        print(f"NVPM ERROR: Invalid mode ID {mode_id}; valid IDs: {', '.join(map(str, ids))}", file=sys.stderr)
        return 1
    target = conf.model(mode_id)
    if target.id != current.id and needs_reboot(root, current, target):
        print(f"NVPM WARN: Reboot required for changing to this power mode: {mode_id}")
        print("NVPM WARN: DO YOU WANT TO REBOOT NOW? enter YES/yes to confirm:", flush=True)
        answer = sys.stdin.readline().strip()
        if answer not in ("YES", "yes"):
            print("NVPM ERROR: optMask is 1, no request for power mode")
            return 1
        # the device reboots and comes up in the new mode: apply it over a freshly booted tree
        root.write(NVPMODEL_STATUS, f"pmode:{mode_id:04d}")
        _reset_after_reboot(root)
        apply_model(root, conf, target)
        return 0
    apply_model(root, conf, target)
    root.write(NVPMODEL_STATUS, f"pmode:{mode_id:04d}")
    if verbose:
        print(f"NVPM VERB: NV Power Mode: {target.name}")
    return 0


def _reset_after_reboot(root: SysRoot) -> None:
    """A reboot brings every core online and drops jetson_clocks' pinned floors."""
    for cpu in root.glob(f"{CPU_DIR}/cpu[0-9]*"):
        if (cpu / "online").exists():
            root.write(cpu / "online", 1)
    for pol in root.glob(f"{CPU_DIR}/cpufreq/policy*"):
        table = (root.read(pol / "scaling_available_frequencies") or "0").split()
        root.write(pol / "scaling_max_freq", table[-1])
        root.write(pol / "scaling_min_freq", table[0])
    gpu = root.path(GPU_DEVFREQ)
    table = (root.read(gpu / "available_frequencies") or "0").split()
    root.write(gpu / "max_freq", table[-1])
    root.write(gpu / "min_freq", table[0])


# -- jetson_clocks ----------------------------------------------------------------------------------

def _clock_files(root: SysRoot) -> list[Path]:
    files = []
    for pol in root.glob(f"{CPU_DIR}/cpufreq/policy*"):
        files += [pol / "scaling_min_freq", pol / "scaling_max_freq"]
    gpu = root.path(GPU_DEVFREQ)
    files += [gpu / "min_freq", gpu / "max_freq"]
    for hw in root.glob("sys/class/hwmon/hwmon*"):
        if root.read(hw / "name") == "pwmfan":
            files.append(hw / "pwm1")
    return [f for f in files if f.exists()]


def jetson_clocks(root: SysRoot, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jetson_clocks")
    p.add_argument("--show", action="store_true")
    p.add_argument("--store", nargs="?", const="/root/l4t_dfs.conf")
    p.add_argument("--restore", nargs="?", const="/root/l4t_dfs.conf")
    p.add_argument("--fan", action="store_true")
    args = p.parse_args(argv)
    if args.show:
        print(_show(root), end="")
        return 0
    if args.store:
        root.write(args.store, "\n".join(f"{root.rel(f)} {root.read(f)}" for f in _clock_files(root)))
        return 0
    if args.restore:
        text = root.read(args.restore)
        if text is None:
            print(f"Error: file {args.restore} doesn't exist", file=sys.stderr)
            return 1
        for line in text.splitlines():
            path, _, value = line.partition(" ")
            root.write(path, value)
        return 0
    for pol in root.glob(f"{CPU_DIR}/cpufreq/policy*"):
        top = root.read(pol / "scaling_max_freq")
        root.write(pol / "scaling_min_freq", top)
        root.write(pol / "scaling_cur_freq", top)
    gpu = root.path(GPU_DEVFREQ)
    top = root.read(gpu / "max_freq")
    root.write(gpu / "min_freq", top)
    root.write(gpu / "cur_freq", top)
    for hw in root.glob("sys/class/hwmon/hwmon*"):
        if root.read(hw / "name") == "pwmfan":
            root.write(hw / "pwm1", 255)
    return 0


def _show(root: SysRoot) -> str:
    board = read_board(root)
    out = [f"SOC family:tegra234  Machine:{board.model}"]
    cpus = sorted(root.glob(f"{CPU_DIR}/cpu[0-9]*"), key=lambda p: int(p.name[3:]))
    online = [c for c in cpus if (root.read_int(c / "online") if (c / "online").exists() else 1) == 1]
    out.append("Online CPUs: " + ",".join(c.name[3:] for c in online))
    for c in cpus:
        on = c in online
        f = c / "cpufreq"
        out.append(f"{c.name}: Online={int(on)} Governor={root.read(f / 'scaling_governor')} "
                   f"MinFreq={root.read(f / 'scaling_min_freq')} MaxFreq={root.read(f / 'scaling_max_freq')} "
                   f"CurrentFreq={root.read(f / 'scaling_cur_freq')} IdleStates: WFI=1 c7=1 ")
    gpu = root.path(GPU_DEVFREQ)
    out.append(f"GPU MinFreq={root.read(gpu / 'min_freq')} MaxFreq={root.read(gpu / 'max_freq')} CurrentFreq={root.read(gpu / 'cur_freq')}")
    emc = root.read(EMC_CAP)
    out.append(f"EMC MinFreq=204000000 MaxFreq={emc} CurrentFreq={emc} FreqOverride=0")
    for hw in root.glob("sys/class/hwmon/hwmon*"):
        if root.read(hw / "name") == "pwmfan":
            out.append(f"FAN Dynamic Speed control=active {hw.name}_pwm1={root.read(hw / 'pwm1')}")
    conf = parse_conf(root.read(NVPMODEL_CONF) or "")
    mode_id = read_status(root)
    out.append(f"NV Power Mode: {conf.model(mode_id if mode_id is not None else conf.default_id).name}")
    return "\n".join(out) + "\n"


# -- tegrastats -------------------------------------------------------------------------------------

def tegrastats(root: SysRoot, argv: list[str]) -> int:
    from .platform import Platform
    from .tegrastats import render_line

    p = argparse.ArgumentParser(prog="tegrastats")
    p.add_argument("--interval", type=int, default=1000, help="sample period, ms")
    p.add_argument("--logfile")
    args = p.parse_args(argv)
    if args.interval <= 0:
        print("tegrastats: --interval must be a positive number of milliseconds", file=sys.stderr)
        return 1
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    plat = Platform(root.root)
    sink = open(args.logfile, "a") if args.logfile else sys.stdout
    try:
        while not stop:
            sink.write(render_line(plat.snapshot()) + "\n")
            sink.flush()
            time.sleep(args.interval / 1000)
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        if sink is not sys.stdout:
            sink.close()
    return 0
