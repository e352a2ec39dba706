"""`edge-sdk doctor`: pass / warn / fail, with a fix, for everything a device needs to run models well."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ...errors import EdgeSDKError
from .platform import Platform
from .root import CUDA_VERSION

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class DoctorOptions:
    emulated: bool | None = None  # the board is an emulated root on a host (None: as the root says)
    bundle_dir: Path = Path(".")
    storage_seconds: float = 2.0
    storage_file_mb: int = 64
    storage: bool = True

    def __post_init__(self):
        self.bundle_dir = Path(self.bundle_dir)


def run_checks(platform: Platform, options: DoctorOptions | None = None) -> list[Check]:
    o = options or DoctorOptions()
    if o.emulated is None:
        o = replace(o, emulated=platform.emulated)
    checks = []
    for fn in (_board, _l4t, _cuda, _tensorrt, _onnxruntime, _memory, _storage, _power_mode, _clocks, _swap,
               _thermal, _governor):
        if fn is _storage and not o.storage:
            continue
        try:
            out = fn(platform, o)
        except EdgeSDKError as exc:
            out = Check(fn.__name__.strip("_").replace("_", " "), FAIL, exc.message, exc.hint or "")
        checks.extend(out if isinstance(out, list) else [out])
    return checks


def _board(p: Platform, o: DoctorOptions) -> Check:
    b = p.board()
    if b.profile:
        return Check("board", PASS, f"{b.profile.title} ({b.profile.module}), model '{b.model}'")
    if b.is_jetson:
        return Check("board", WARN, f"Jetson '{b.model}' with no edge-sdk profile ({', '.join(b.compatible)})",
                     "planner and power policies use generic values; add the board to edge_sdk/data/boards.json")
    return Check("board", FAIL, f"not a Jetson: no nvidia,tegra* in {p.sys.path('proc/device-tree/compatible')}",
                 "run on the device, or pass --emulate BOARD / --root DIR")


def _l4t(p: Platform, o: DoctorOptions) -> Check:
    b = p.board()
    if not b.l4t:
        return Check("l4t", FAIL, f"no readable {p.sys.path('etc/nv_tegra_release')}", "flash JetPack 6.1 or newer (SDK Manager)")
    if not b.l4t.startswith("36."):
        return Check("l4t", WARN, f"L4T {b.l4t} (JetPack {b.jetpack or '?'}): the SDK targets r36",
                     "upgrade to JetPack 6.1+ (CUDA 12.6, TensorRT 10.3)")
    return Check("l4t", PASS, f"L4T {b.l4t}, JetPack {b.jetpack or 'unknown for this L4T'}")


def _cuda(p: Platform, o: DoctorOptions) -> Check:
    text = p.sys.read(CUDA_VERSION)
    if text is None:
        return Check("cuda", FAIL, f"no CUDA toolkit at {p.sys.path('usr/local/cuda')}", "sudo apt install nvidia-jetpack (CUDA comes with JetPack)")
    version = json.loads(text).get("cuda", {}).get("version", "?")
    detail = f"CUDA {version}" + (" (emulated board's toolkit; this host runs the CPU path)" if o.emulated else "")
    return Check("cuda", PASS, detail)


def _tensorrt(p: Platform, o: DoctorOptions) -> Check:
    if importlib.util.find_spec("tensorrt") is None:
        fix = ("on the device: sudo apt install python3-libnvinfer (JetPack's TensorRT 10.3); "
               "without it the runtime uses onnxruntime and engines cannot be built")
        # only a real Jetson needs it: an emulated root or a host's tree runs the onnxruntime path
        needed = not o.emulated and p.board().is_jetson
        return Check("tensorrt", FAIL if needed else WARN, "TensorRT Python bindings are not importable", fix)
    import tensorrt

    return Check("tensorrt", PASS, f"TensorRT {tensorrt.__version__}")


ORT_WHEELS = ("onnxruntime", "onnxruntime-gpu")
JETSON_ORT_FIX = ("pip uninstall -y onnxruntime onnxruntime-gpu, then install NVIDIA's onnxruntime-gpu wheel for "
                  "JetPack 6 (pypi.jetson-ai-lab.io) and `pip install 'edge-sdk[jetson]'` (no CPU onnxruntime)")


def ort_wheels() -> list[str]:
    """Installed distributions that provide the `onnxruntime` module (both share one directory)."""
    from importlib.metadata import distributions

    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in distributions()}
    return [w for w in ORT_WHEELS if w in names]


def _onnxruntime(p: Platform, o: DoctorOptions) -> Check:
    wheels = ort_wheels()
    if len(wheels) > 1:
        # the CPU wheel's files overwrite the GPU wheel's: `auto` runs on the CPU, `cuda` raises
        return Check("onnxruntime", FAIL, "both onnxruntime and onnxruntime-gpu are installed (they share one module)", JETSON_ORT_FIX)
    if importlib.util.find_spec("onnxruntime") is None:
        return Check("onnxruntime", FAIL, "onnxruntime is not installed", "pip install 'edge-sdk[runtime]' (on Jetson: " + JETSON_ORT_FIX + ")")
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    gpu = [x for x in providers if x in ("TensorrtExecutionProvider", "CUDAExecutionProvider")]
    detail = f"onnxruntime {onnxruntime.__version__}: {', '.join(providers)}"
    if gpu:
        return Check("onnxruntime", PASS, detail)
    needed = not o.emulated and p.board().is_jetson  # a Jetson without the CUDA provider runs everything on the CPU
    return Check("onnxruntime", FAIL if needed else WARN, detail + " (no CUDA provider: CPU only)", JETSON_ORT_FIX)


def _host_ram_kb() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    except (ValueError, OSError, AttributeError):
        return None


def _memory(p: Platform, o: DoctorOptions) -> list[Check]:
    mem = p.meminfo()
    total_mb = mem.total_kb // 1024  # MiB (meminfo's kB are KiB)
    out = []
    prof = p.board().profile
    if prof and total_mb < prof.mem_total_mb * 0.95:
        out.append(Check("memory", FAIL, f"{prof.title} should show ~{prof.mem_total_mb} MiB, the kernel reports {total_mb} MiB",
                         "memory is claimed but not there: check the module (carveouts, mem= on the kernel command line)"))
    else:
        out.append(Check("memory", PASS, f"MemTotal {total_mb} MiB" + (f" (a {prof.memory_gb} GB module)" if prof else "")))
    host = _host_ram_kb()
    if o.emulated and host and mem.total_kb > host:
        out[-1] = Check("memory", WARN, f"the emulated board claims {total_mb} MiB but this host has {host // 1024} MiB",
                        "memory-bound runs will swap on this host; emulate a smaller board or plan with --board")
    alloc_mb = mem.allocatable_gpu_kb // 1024
    status = PASS if alloc_mb >= total_mb * 0.5 else WARN
    out.append(Check("gpu memory", status, f"allocatable {alloc_mb} MiB of {total_mb} MiB (NvMap used {mem.nvmap_used_kb // 1024} MiB)",
                     "" if status == PASS else "free memory: stop other GPU processes, drop caches (sync; echo 3 > /proc/sys/vm/drop_caches)"))
    return out


def _storage(p: Platform, o: DoctorOptions) -> list[Check]:
    from .storage_probe import probe_storage

    r = probe_storage(o.bundle_dir, seconds=o.storage_seconds, size_mb=o.storage_file_mb)
    prof = p.board().profile
    exp = prof.storage[prof.default_storage] if prof else None
    where = f"{o.bundle_dir.resolve()}" + (" (this host's disk)" if o.emulated else "")
    how = "direct I/O" if r.direct else r.note
    out = []
    for name, got, want, unit in (("storage read", r.seq_mbps, exp.read_mbps if exp else None, "MB/s"),
                                  ("storage 4k iops", r.rand4k_iops, exp.rand4k_iops if exp else None, "IOPS")):
        detail = f"{got:g} {unit} on {where}, {how}" + (f"; board expects {want:g} {unit} ({exp.kind})" if want else "")
        status = PASS if want is None or got >= 0.5 * want else WARN
        out.append(Check(name, status, detail, "" if status == PASS else
                         f"keep bundles on {exp.kind.upper()} (M.2 NVMe on AGX/NX), not eMMC or SD; paging speed is bound by this"))
    return out


def _power_mode(p: Platform, o: DoctorOptions) -> Check:
    from .power import PowerManager, mode_rank

    pm = PowerManager(p)
    cur = pm.current()
    top = max(pm.modes(), key=mode_rank)
    if cur.id == top.id:
        return Check("power mode", PASS, f"{cur.name} (id {cur.id}, {cur.budget_w:g} W)")
    return Check("power mode", WARN, f"{cur.name} (id {cur.id}, {cur.budget_w:g} W); fastest is {top.name}",
                 f"edge-sdk power set {top.name}" + (" --allow-reboot" if pm.needs_reboot(top, cur) else ""))


def _clocks(p: Platform, o: DoctorOptions) -> Check:
    gpu = p.hardware.gpu_devfreq
    lo, hi = (p.sys.read_int(gpu / "min_freq"), p.sys.read_int(gpu / "max_freq")) if gpu else (None, None)
    if lo is None or hi is None:
        return Check("jetson_clocks", WARN, "GPU devfreq not readable", "check /sys/class/devfreq/17000000.gpu")
    if lo == hi:
        return Check("jetson_clocks", PASS, f"clocks pinned at the mode's caps (GPU {hi // 1_000_000} MHz)")
    return Check("jetson_clocks", PASS, f"dynamic clocks (GPU {lo // 1_000_000}-{hi // 1_000_000} MHz)",
                 "sudo jetson_clocks pins them for steady latency and benchmarks")


def _swap(p: Platform, o: DoctorOptions) -> Check:
    lines = (p.sys.read("proc/swaps") or "").splitlines()[1:]
    devs = [ln.split()[0] for ln in lines if ln.split()]
    if not devs:
        return Check("swap", WARN, "no swap", "enable zram (nvzramconfig service) so page-cache spikes do not OOM the runtime")
    if all("zram" in d for d in devs):
        return Check("swap", PASS, f"zram swap ({len(devs)} devices)")
    return Check("swap", WARN, f"swap on {', '.join(d for d in devs if 'zram' not in d)}",
                 "swap on flash is slow and wears it: prefer zram (nvzramconfig)")


def _thermal(p: Platform, o: DoctorOptions) -> Check:
    snap = p.snapshot()
    tj = snap.temp_c("tj")
    trip = p.trip_point_mc("tj")
    if tj is None or trip is None:
        return Check("thermal", WARN, "no tj temperature or trip point", "check /sys/class/thermal (tj-thermal)")
    headroom = trip / 1000 - tj
    status = PASS if headroom >= 20 else WARN if headroom >= 10 else FAIL
    return Check("thermal", status, f"tj {tj:.1f} C, trip {trip / 1000:.1f} C, headroom {headroom:.1f} C",
                 "" if status == PASS else "improve cooling (fan, airflow) or use edge-sdk power policy thermal-guard")


def _governor(p: Platform, o: DoctorOptions) -> Check:
    govs = {g for g in p.cpu_governors().values() if g}
    if not govs:
        return Check("cpu governor", WARN, "cpufreq governor not readable", "check /sys/devices/system/cpu/cpu*/cpufreq")
    bad = govs - {"schedutil", "performance"}
    if bad:
        return Check("cpu governor", WARN, f"governor {', '.join(sorted(govs))}",
                     "echo schedutil | sudo tee /sys/devices/system/cpu/cpufreq/policy*/scaling_governor")
    return Check("cpu governor", PASS, f"governor {', '.join(sorted(govs))}")
