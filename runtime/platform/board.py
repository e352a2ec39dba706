"""Which board this root is: device-tree model and compatible, L4T release and JetPack."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...boards import Board, all_boards
from .root import DT_COMPATIBLE, DT_MODEL, TEGRA_RELEASE, SysRoot

# L4T release -> JetPack
L4T_JETPACK = {"36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1"}


@dataclass
class BoardInfo:
    model: str | None
    compatible: list[str] = field(default_factory=list)
    l4t: str | None = None  # "36.4.4"
    jetpack: str | None = None
    profile: Board | None = None

    @property
    def name(self) -> str | None:
        return self.profile.name if self.profile else None

    @property
    def module(self) -> str | None:
        return self.profile.module if self.profile else None

    @property
    def is_jetson(self) -> bool:
        return any(c.startswith("nvidia,tegra") for c in self.compatible)


def parse_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.4, ...' -> '36.4.4'."""
    m = re.search(r"R(\d+) \(release\), REVISION: (\d+)\.(\d+)", text or "")
    return f"{m[1]}.{m[2]}.{m[3]}" if m else None


def jetpack_of(l4t: str | None) -> str | None:
    if not l4t:
        return None
    if l4t in L4T_JETPACK:
        return L4T_JETPACK[l4t]
    major_minor = ".".join(l4t.split(".")[:2])
    known = [jp for rel, jp in L4T_JETPACK.items() if rel.startswith(major_minor + ".")]
    return known[-1] if known else None


def match_profile(compatible: list[str]) -> Board | None:
    """The board profile whose module-specific compatible strings the device lists."""
    for board in all_boards():
        specific = [c for c in board.dt_compatible if not c.startswith("nvidia,tegra")]
        if specific and specific[1 if len(specific) > 1 else 0] in compatible:
            return board
    return None


def read_board(root: SysRoot) -> BoardInfo:
    raw = root.path(DT_COMPATIBLE)
    try:
        compatible = [c for c in raw.read_bytes().decode(errors="replace").split("\0") if c]
    except OSError:
        compatible = []
    l4t = parse_tegra_release(root.read(TEGRA_RELEASE) or "")
    return BoardInfo(model=root.read(DT_MODEL), compatible=compatible, l4t=l4t, jetpack=jetpack_of(l4t),
                     profile=match_profile(compatible))
