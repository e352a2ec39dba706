"""One filesystem root for every reading and one wrapper for every command.

On a device the root is ``/``; the emulator and tests pass a directory holding the same tree. Commands
(`nvpmodel`, `jetson_clocks`, `tegrastats`) are looked up in ``ROOT/bin`` first, then on ``PATH``, and
always run with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ...errors import PlatformError

# fixed sysfs locations (L4T r36; readers also try the r35 ones below)
GPU_DEVICE = "sys/devices/platform/bus@0/17000000.gpu"
GPU_DEVFREQ = "sys/class/devfreq/17000000.gpu"
GPU_LOAD_PATHS = (f"{GPU_DEVICE}/load", "sys/devices/gpu.0/load")  # r36, r35
GPU_DEVFREQ_PATHS = (GPU_DEVFREQ, "sys/devices/17000000.ga10b/devfreq/17000000.ga10b", "sys/class/devfreq/17000000.ga10b")
INA3221_GLOB = "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
HWMON_GLOB = "sys/class/hwmon/hwmon*"
THERMAL_GLOB = "sys/class/thermal/thermal_zone*"
CPU_DIR = "sys/devices/system/cpu"
EMC_CAP = "sys/kernel/nvpmodel_clk_cap/emc"
EMC_RATE = "sys/kernel/debug/bpmp/debug/clk/emc/rate"
EMC_ACTIVITY = "sys/kernel/actmon_avg_activity/mc_all"
NVPMODEL_CONF = "etc/nvpmodel.conf"
NVPMODEL_STATUS = "var/lib/nvpmodel/status"
TEGRA_RELEASE = "etc/nv_tegra_release"
DT_MODEL = "proc/device-tree/model"
DT_COMPATIBLE = "proc/device-tree/compatible"
CUDA_VERSION = "usr/local/cuda/version.json"
EMULATED_MARKER = ".edge-sdk-emulated.json"  # laid out by the emulator: {"board": NAME}


class SysRoot:
    """Paths and tolerant reads under a root directory."""

    def __init__(self, root: str | os.PathLike = "/"):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"SysRoot({str(self.root)!r})"

    def path(self, rel: str | os.PathLike) -> Path:
        return self.root / str(rel).lstrip("/")

    def rel(self, path: Path) -> str:
        """The device path ("/sys/...") of a path under this root."""
        return "/" + path.relative_to(self.root).as_posix()

    def read(self, rel: str | os.PathLike) -> str | None:
        """Stripped text of a file, or None when it is missing, unreadable or empty (EAGAIN on cv zones)."""
        p = rel if isinstance(rel, Path) and rel.is_absolute() else self.path(rel)
        try:
            text = p.read_bytes().decode(errors="replace").strip("\0\n ")
        except OSError:
            return None
        return text or None

    def read_int(self, rel: str | os.PathLike) -> int | None:
        text = self.read(rel)
        try:
            return int(text) if text is not None else None
        except ValueError:
            return None

    def write(self, rel: str | os.PathLike, value) -> None:
        """Write a sysfs knob (atomically in an emulated tree: readers never see a half value)."""
        p = rel if isinstance(rel, Path) and rel.is_absolute() else self.path(rel)
        if self.root == Path("/"):
            p.write_text(f"{value}\n")
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{value}\n")
        os.replace(tmp, p)

    def glob(self, pattern: str) -> list[Path]:
        return sorted(self.root.glob(pattern), key=_natural_key)

    def search_path(self) -> str:
        dirs = [str(self.path("bin"))] if self.root != Path("/") else []
        return os.pathsep.join(dirs + [os.environ.get("PATH", os.defpath)])

    def which(self, command: str) -> str | None:
        return shutil.which(command, path=self.search_path())

    def run(self, args: list[str], *, timeout: float = 15.0, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run a board command (found in ROOT/bin, then PATH) with a timeout."""
        exe = self.which(args[0])
        if exe is None:
            raise PlatformError(f"'{args[0]}' is not on PATH (searched {self.search_path()})",
                                hint="install JetPack's nvidia-l4t-tools on the device, or use --emulate BOARD")
        env = dict(os.environ, PATH=self.search_path())
        try:
            proc = subprocess.run([exe, *args[1:]], input=input, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            raise PlatformError(f"'{' '.join(args)}' did not finish within {timeout:g} s",
                                hint="check the board is responsive; raise the timeout for slow tools") from exc
        if check and proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise PlatformError(f"'{' '.join(args)}' failed with exit code {proc.returncode}: {' / '.join(tail)}")
        return proc


def _natural_key(p: Path):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.as_posix())]


@lru_cache(maxsize=1)
def tegra234_data() -> dict:
    """Emulation and layout data shipped in jetson/boards/tegra234.json."""
    return json.loads(resources.files("edge_sdk.jetson").joinpath("boards/tegra234.json").read_text())
