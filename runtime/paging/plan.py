"""Which layers stay resident and which are streamed: the executor's memory model, also used to
estimate paged decode speed (tokens/s = min(storage bytes/s / bytes paged per token, resident speed))."""

from __future__ import annotations

from dataclasses import dataclass

from edge_sdk.errors import MemoryBudgetError

PAGE = 4096
DEFAULT_SLOTS = 2  # one layer computing, one being read


def page_round(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass(frozen=True)
class PagingPlan:
    budget_bytes: int
    fixed_bytes: int  # resident outside the layers: final norm, lm_head
    layer_bytes: tuple[int, ...]
    resident: tuple[int, ...]  # layer indices kept in memory
    paged: tuple[int, ...]  # layer indices read from storage on every forward pass
    slots: int  # prefetch buffers
    slot_bytes: int
    slot_copies: int = 1  # layer-sized allocations per slot (2 where a session prepacks a copy of the slot)

    @property
    def resident_bytes(self) -> int:
        return sum(page_round(self.layer_bytes[i]) for i in self.resident)

    @property
    def peak_bytes(self) -> int:
        return self.fixed_bytes + self.resident_bytes + self.slots * self.slot_bytes * self.slot_copies

    @property
    def bytes_paged_per_token(self) -> int:
        return sum(self.layer_bytes[i] for i in self.paged)

    def decode_tokens_per_s(self, read_bytes_per_s: float, resident_tokens_per_s: float | None = None,
                            paged_compute_tokens_per_s: float | None = None) -> float:
        """Decode speed (batch 1) of this plan. Reads overlap compute, so a token takes the longer of
        reading the paged layers and computing every layer: resident layers at the resident speed,
        paged ones at the speed of the weights-as-inputs graph (both whole-model tokens/s, given per
        layer by dividing by the layer count). Without compute speeds: the storage bound alone."""
        read_s = self.bytes_paged_per_token / read_bytes_per_s if self.paged else 0.0
        n = len(self.layer_bytes)
        compute_s = 0.0
        if resident_tokens_per_s:
            compute_s += len(self.resident) / n / resident_tokens_per_s
            compute_s += len(self.paged) / n / (paged_compute_tokens_per_s or resident_tokens_per_s)
        t = max(read_s, compute_s)
        return 1.0 / t if t else float("inf")

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "fixed_bytes": self.fixed_bytes, "resident_layers": list(self.resident),
                "paged_layers": list(self.paged), "slots": self.slots, "slot_bytes": self.slot_bytes, "slot_copies": self.slot_copies,
                "peak_bytes": self.peak_bytes, "bytes_paged_per_token": self.bytes_paged_per_token}


def spread(n: int, k: int) -> tuple[int, ...]:
    """k of n indices, evenly spaced. Resident layers interleaved with paged ones give the reader a
    resident layer's compute time to read behind, so it rarely stalls on full prefetch buffers."""
    if k <= 0:
        return ()
    return tuple(sorted({int((j + 0.5) * n / k) for j in range(k)}))


def plan_paging(layer_bytes: list[int], fixed_bytes: int, budget_bytes: int, slots: int = DEFAULT_SLOTS,
                slot_copies: int = 1) -> PagingPlan:
    layers = tuple(int(b) for b in layer_bytes)
    total = fixed_bytes + sum(page_round(b) for b in layers)
    if total <= budget_bytes:
        return PagingPlan(budget_bytes, fixed_bytes, layers, tuple(range(len(layers))), (), 0, 0, slot_copies)
    slot = page_round(max(layers))
    room = budget_bytes - fixed_bytes - slots * slot * slot_copies
    if room < 0:
        need = fixed_bytes + slots * slot * slot_copies
        raise MemoryBudgetError(
            f"a memory budget of {budget_bytes:,} bytes cannot page this model: lm_head and norms take {fixed_bytes:,} "
            f"bytes and {slots} layer buffers {slots * slot * slot_copies:,} bytes (at least {need:,} in all)",
            hint=f"raise --memory-budget to at least {need:,} bytes, or use a board with more memory")
    keep = min(len(layers), room // slot)
    resident = spread(len(layers), keep)
    paged = tuple(i for i in range(len(layers)) if i not in resident)
    return PagingPlan(budget_bytes, fixed_bytes, layers, resident, paged, slots, slot, slot_copies)


def parse_budget(value: int | str, weight_bytes: int) -> int:
    """`BYTES` or `PERCENT%` (of the bundle's weights) -> bytes."""
    from edge_sdk.errors import ConfigError

    text = str(value).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            return int(weight_bytes * pct / 100)
        n = int(float(text))
        if n <= 0:
            raise ValueError
        return n
    except ValueError:
        raise ConfigError(f"memory budget {value!r} is not a positive byte count or a percentage in (0, 100]",
                          hint="write e.g. --memory-budget 2000000000 or --memory-budget 50%") from None
