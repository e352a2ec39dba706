"""/proc/meminfo with NvMap fields and NVIDIA's allocatable-GPU-memory formula."""

from __future__ import annotations

from dataclasses import dataclass, field


def parse_meminfo(text: str) -> dict[str, int]:
    """{field: kB} of /proc/meminfo text."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out


@dataclass
class MemInfo:
    fields: dict[str, int] = field(default_factory=dict)  # kB

    def kb(self, name: str) -> int:
        return self.fields.get(name, 0)

    @property
    def total_kb(self) -> int:
        return self.kb("MemTotal")

    @property
    def nvmap_used_kb(self) -> int:
        return self.kb("NvMapMemUsed")

    @property
    def allocatable_gpu_kb(self) -> int:
        """NVIDIA's formula: what cudaMalloc can get on unified memory (cudaMemGetInfo reports only MemFree)."""
        total, free, nvmap, swap_free = self.total_kb, self.kb("MemFree"), self.nvmap_used_kb, self.kb("SwapFree")
        host_used = (total - free) - nvmap
        if host_used < swap_free:
            return total - nvmap
        return total - (host_used - swap_free)

    @property
    def allocatable_gpu_bytes(self) -> int:
        return self.allocatable_gpu_kb * 1024

    @property
    def ram_used_mb(self) -> int:
        """RAM in use as tegrastats counts it (page cache and buffers excluded)."""
        used = self.total_kb - self.kb("MemFree") - self.kb("Buffers") - self.kb("Cached")
        return max(0, used) // 1024

    @property
    def swap_used_mb(self) -> int:
        return (self.kb("SwapTotal") - self.kb("SwapFree")) // 1024


def render_meminfo(fields: dict[str, int]) -> str:
    return "".join(f"{k + ':':<16}{v:>8} kB\n" for k, v in fields.items())
