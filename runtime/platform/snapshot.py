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
        if not self.rails:
            return None
        if "VDD_IN" in self.rails:
            return self.rails["VDD_IN"].mw
        names = [n for n in (total_rails or self.rails) if n in self.rails]
        return sum(self.rails[n].mw for n in names)

    def to_dict(self) -> dict:
        return asdict(self)
