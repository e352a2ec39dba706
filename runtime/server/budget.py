"""Where the daemon's memory budget and power-mode reading come from.

The platform layer (edge_sdk.runtime.platform) owns board readings: the budget is its allocatable
GPU memory; the power mode is read from nvpmodel's status file under the same root.
"""

from __future__ import annotations

from pathlib import Path

from ...boards import get_board
from ...errors import EdgeSDKError
from ..platform import Platform


def memory_budget_bytes(root: str | None, emulate: str | None) -> tuple[int, str]:
    """(bytes, where the number came from): the platform layer's allocatable GPU memory (NVIDIA's
    formula over ROOT/proc/meminfo; the emulated board's root under --emulate)."""
    platform = Platform.from_options(emulate=emulate, root=root)
    return int(platform.allocatable_gpu_bytes()), f"allocatable GPU memory per {platform.root}/proc/meminfo"


def power_mode_reader(root: str | None, emulate: str | None):
    """A callable returning the current nvpmodel mode name (or None when unknown); it reads
    nvpmodel's status file under the board root (the emulated root under --emulate)."""
    root = str(Platform.from_options(emulate=emulate, root=root).root)
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
