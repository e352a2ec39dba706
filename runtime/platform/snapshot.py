"""One plain reading of the board, the type every reader fills and tegrastats parses into."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

OFFLINE_MC = -256000  # what an offline thermal sensor reads


@dataclass
class CpuCore:
    online: bool
    load_pct: int = 0
    mhz: int = 0


@dataclass
class Rail:
    mw: int  # instantaneous power, mW
    avg_mw: int  # average since the reader started, mW
    mv: int | None = None  # bus voltage
    ma: int | None = None  # current


@dataclass
class Snapshot:
    stamp: str = ""  # MM-DD-YYYY HH:MM:SS, as tegrastats prints it
    ram_used_mb: int = 0
    ram_total_mb: int = 0
    lfb_blocks: int | None = None  # largest free block: count x size
    lfb_block_mb: int | None = None
    swap_used_mb: int = 0
    swap_total_mb: int = 0
    swap_cached_mb: int = 0
    cpus: list[CpuCore] = field(default_factory=list)
    emc_load_pct: int | None = None
    emc_mhz: int | None = None
    gpu_load_pct: int | None = None
    gpu_mhz: list[int] = field(default_factory=list)  # one value, or one per GPC (r36 "[a,b]")
    gpu_mhz_bracketed: bool = False
    engines: dict[str, str] = field(default_factory=dict)  # NVENC -> "79%@166" | "off", APE -> "174"
    temps_mc: dict[str, int] = field(default_factory=dict)  # tegrastats name (cpu, tj, soc0) -> m°C
    rails: dict[str, Rail] = field(default_factory=dict)  # label -> reading
    fan_pwm: int | None = None  # 0-255
    fan_rpm: int | None = None
    time_s: float = 0.0  # monotonic seconds when read (for energy integration)

    def temp_c(self, name: str) -> float | None:
        mc = self.temps_mc.get(name)
        return None if mc is None or mc <= OFFLINE_MC else mc / 1000

    def total_power_mw(self, total_rails: list[str] | None = None) -> int | None:
        """Board input power: VDD_IN where the board has it, else the sum of the given (or all) rails."""
        return input_power_mw({n: r.mw for n, r in self.rails.items()}, total_rails)

    def to_dict(self) -> dict:
        return asdict(self)


def input_power_mw(rails_mw: dict[str, int], total_rails: list[str] | None = None) -> int | None:
    """Board input power (mW) from rail readings: VDD_IN where the board has it, else the sum of
    `total_rails` (or of all rails); None without rails."""
    if not rails_mw:
        return None
    if "VDD_IN" in rails_mw:
        return rails_mw["VDD_IN"]
    return sum(rails_mw[n] for n in (total_rails or rails_mw) if n in rails_mw)
