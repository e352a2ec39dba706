"""Where the daemon's memory budget and power-mode reading come from.

The platform layer (edge_sdk.runtime.platform) owns board readings; these helpers use it when it
offers them and otherwise read the same files under the board root themselves: NVIDIA's
allocatable-memory formula over /proc/meminfo, and nvpmodel's status file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ...boards import get_board
from ...errors import EdgeSDKError, PlatformError

log = logging.getLogger(__name__)
KIB = 1024


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {field: bytes}."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (KIB if parts[1:2] == ["kB"] else 1)
    return out


def allocatable_bytes(meminfo: dict[str, int]) -> int:
    """NVIDIA's formula for what the GPU can still allocate on a Jetson (unified memory).

    host_used = (MemTotal - MemFree) - NvMapMemUsed; if host_used < SwapFree the page cache and
    host allocations can be swapped/reclaimed: MemTotal - NvMapMemUsed; else MemTotal - (host_used - SwapFree).
    """
    total, free = meminfo["MemTotal"], meminfo["MemFree"]
    nvmap = meminfo.get("NvMapMemUsed", 0)
    swap_free = meminfo.get("SwapFree", 0)
    host_used = (total - free) - nvmap
    return total - nvmap if host_used < swap_free else total - (host_used - swap_free)


def memory_budget_bytes(root: str | None, emulate: str | None) -> tuple[int, str]:
    """(bytes, where the number came from): the platform layer's allocatable GPU memory when this
    build has it; otherwise the emulated board's MemTotal, or NVIDIA's formula over ROOT/proc/meminfo."""
    platform = _platform(root, emulate)
    if platform is not None:
        return int(platform.allocatable_gpu_bytes()), "platform allocatable GPU memory"
    if emulate and not root:
        board = get_board(emulate)
        return board.mem_total_mb * 2**20, f"emulated {board.name} MemTotal"
    path = Path(root or "/") / "proc" / "meminfo"
    try:
        info = parse_meminfo(path.read_text())
    except OSError as exc:
        raise PlatformError(f"cannot read {path}: {exc.strerror}", hint="pass --root with the board root or --emulate BOARD") from exc
    if "MemTotal" not in info or "MemFree" not in info:
        raise PlatformError(f"{path} has no MemTotal/MemFree", hint="pass --root with the board root or --emulate BOARD")
    return allocatable_bytes(info), f"allocatable per {path}"


def _platform(root: str | None, emulate: str | None):
    """The platform layer's Platform for these options, or None where this build lacks it."""
    try:
        from ..platform import Platform

        platform = Platform.from_options(emulate=emulate, root=root)
    except (ImportError, AttributeError) as exc:
        log.debug("platform layer unavailable (%s): reading the budget directly", exc)
        return None
    return platform if hasattr(platform, "allocatable_gpu_bytes") else None


def power_mode_reader(root: str | None, emulate: str | None):
    """A callable returning the current nvpmodel mode name (or None when unknown); it reads
    nvpmodel's status file under the board root (the emulated root under --emulate)."""
    platform = _platform(root, emulate)
    if platform is not None:
        root = str(platform.root)
    board_name = emulate
    if not board_name:
        model = Path(root or "/") / "proc" / "device-tree" / "model"
        try:
            text = model.read_bytes().rstrip(b"\0").decode()
        except OSError:
            text = ""
        from ...boards import all_boards

        board_name = next((b.name for b in all_boards() if b.dt_model == text), None) if text else None
    if not board_name:
        return lambda: None
    board = get_board(board_name)
    status = Path(root or "/") / "var" / "lib" / "nvpmodel" / "status"

    def read() -> str | None:
        try:
            text = status.read_text().strip()  # "pmode:0002"
            return board.mode(int(text.partition(":")[2])).name
        except (OSError, ValueError, EdgeSDKError):
            return board.default_mode.name if emulate and not root else None

    return read
