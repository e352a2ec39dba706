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
    sessions: int = 0  # layer sessions holding a prepacked copy of a paged layer, alive at once (fused executor)

    @property
    def resident_bytes(self) -> int:
        return sum(page_round(self.layer_bytes[i]) for i in self.resident)

    @property
    def peak_bytes(self) -> int:
        return self.fixed_bytes + self.resident_bytes + (self.slots + self.sessions) * self.slot_bytes

    @property
    def bytes_paged_per_token(self) -> int:
        return sum(self.layer_bytes[i] for i in self.paged)

    def decode_tokens_per_s(self, read_bytes_per_s: float, resident_tokens_per_s: float | None = None,
                            paged_compute_tokens_per_s: float | None = None, build_s: float | None = None,
                            cores: int = 1, threads: int = 1, builds_per_s: float | None = None,
                            release_early: bool = True) -> float:
        """Decode speed (batch 1) of this plan. Reads overlap compute, so a token takes the longest of:
        reading the paged layers; computing every layer (resident layers at the resident speed, paged
        ones at `paged_compute_tokens_per_s`, whole-model tokens/s divided by the layer count); and,
        for the fused executor, building the paged layers' sessions (`build_s` each, on up to
        `sessions - 1` builder threads, or at `builds_per_s` measured with all builders busy) with the
        whole CPU work shared by `cores` (compute runs on `threads`), and the slots' turnover: a slot
        holds its layer while it is read and while its session builds (until the layer has run too,
        without `release_early`), so `slots` of them pass at most slots / (read + build) layers a
        second. Without compute speeds: the storage bound alone."""
        read_s = self.bytes_paged_per_token / read_bytes_per_s if self.paged else 0.0
        n = len(self.layer_bytes)
        compute_s = 0.0
        if resident_tokens_per_s:
            compute_s += len(self.resident) / n / resident_tokens_per_s
            compute_s += len(self.paged) / n / (paged_compute_tokens_per_s or resident_tokens_per_s)
        t = max(read_s, compute_s)
        if build_s and self.paged:
            builds = len(self.paged) * build_s
            builders = max(1, min(self.sessions - 1, cores) if self.sessions > 1 else 1)
            in_parallel = len(self.paged) / builds_per_s if builds_per_s else builds / builders
            t = max(t, in_parallel, (compute_s * threads + builds) / max(1, cores))
            held = self.slot_bytes / read_bytes_per_s + build_s
            if not release_early:
                held += compute_s / n
            t = max(t, len(self.paged) * held / max(1, self.slots))
        return 1.0 / t if t else float("inf")

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "fixed_bytes": self.fixed_bytes, "resident_layers": list(self.resident),
                "paged_layers": list(self.paged), "slots": self.slots, "slot_bytes": self.slot_bytes, "sessions": self.sessions,
                "peak_bytes": self.peak_bytes, "bytes_paged_per_token": self.bytes_paged_per_token}


def spread(n: int, k: int) -> tuple[int, ...]:
    """k of n indices, evenly spaced. Resident layers interleaved with paged ones give the reader a
    resident layer's compute time to read behind, so it rarely stalls on full prefetch buffers."""
    if k <= 0:
        return ()
    return tuple(sorted({int((j + 0.5) * n / k) for j in range(k)}))


def plan_paging(layer_bytes: list[int], fixed_bytes: int, budget_bytes: int, slots: int = DEFAULT_SLOTS,
                sessions: int = 0) -> PagingPlan:
    layers = tuple(int(b) for b in layer_bytes)
    total = fixed_bytes + sum(page_round(b) for b in layers)
    if total <= budget_bytes:
        return PagingPlan(budget_bytes, fixed_bytes, layers, tuple(range(len(layers))), (), 0, 0, 0)
    slot = page_round(max(layers))
    room = budget_bytes - fixed_bytes - (slots + sessions) * slot
    if room < 0:
        need = fixed_bytes + (slots + sessions) * slot
        raise MemoryBudgetError(
            f"a memory budget of {budget_bytes:,} bytes cannot page this model: lm_head and norms take {fixed_bytes:,} "
            f"bytes and {slots + sessions} layer buffers {(slots + sessions) * slot:,} bytes (at least {need:,} in all)",
            hint=f"raise --memory-budget to at least {need:,} bytes, or use a board with more memory")
    keep = min(len(layers), room // slot)
    resident = spread(len(layers), keep)
    paged = tuple(i for i in range(len(layers)) if i not in resident)
    return PagingPlan(budget_bytes, fixed_bytes, layers, resident, paged, slots, slot, sessions)


# fused executor (runtime/paging/fused.py): (raw read slots, prepacked sessions alive at once), most
# overlap first: two slots keep the reader reading while sessions build; three sessions let two build
# (one per core) while one computes
PIPELINE_SHAPES = ((2, 3), (1, 2), (1, 1))
# with a measured build (BuildProbe) these are weighed too: a third slot, bought with a resident layer,
# pays where a session takes longer to build than its layer takes to read
MEASURED_SHAPES = ((3, 3),) + PIPELINE_SHAPES
RESIDENCY_MARGIN = 1.03  # another shape must be predicted this much faster to page more layers


@dataclass(frozen=True)
class BuildProbe:
    """What the fused executor measured at load on one paged layer, for choosing its plan: the storage
    read speed (one large aligned read), the time to build a layer session from its slot, and the time
    to run one layer at batch 1."""
    read_bytes_per_s: float
    build_s: float
    layer_compute_s: float
    cores: int = 1
    threads: int = 1
    release_early: bool = True

    def to_dict(self) -> dict:
        return {"read_bytes_per_s": round(self.read_bytes_per_s), "build_s": round(self.build_s, 5),
                "layer_compute_s": round(self.layer_compute_s, 6), "cores": self.cores, "threads": self.threads,
                "release_early": self.release_early}

    def tokens_per_s(self, p: PagingPlan) -> float:
        compute_tps = 1.0 / (len(p.layer_bytes) * self.layer_compute_s) if self.layer_compute_s > 0 else None
        return p.decode_tokens_per_s(self.read_bytes_per_s, compute_tps, compute_tps, build_s=self.build_s,
                                     cores=self.cores, threads=self.threads, release_early=self.release_early)


def plan_pipelined(layer_bytes: list[int], fixed_bytes: int, budget_bytes: int,
                   probe: BuildProbe | None = None) -> PagingPlan:
    """The fused executor's plan. Without a probe: the most pipelining the budget allows
    (PIPELINE_SHAPES), the rest to resident layers. With one: of the shapes that fit (MEASURED_SHAPES),
    the one the decode model predicts fastest from the probe's read, build and compute times, keeping
    more layers resident unless paging more is predicted RESIDENCY_MARGIN faster."""
    plans = []
    for slots, sessions in (MEASURED_SHAPES if probe else PIPELINE_SHAPES):
        try:
            plans.append(plan_paging(layer_bytes, fixed_bytes, budget_bytes, slots, sessions=sessions))
        except MemoryBudgetError as exc:
            error = exc
            continue
        if probe is None or not plans[-1].paged:
            return plans[-1]
    if not plans:
        raise error
    best = plans[0]
    for p in plans[1:]:
        fewer_paged = len(p.paged) < len(best.paged)
        ratio = probe.tokens_per_s(p) / probe.tokens_per_s(best)
        if ratio > RESIDENCY_MARGIN or (ratio >= 1 / RESIDENCY_MARGIN and fewer_paged):
            best = p
    return best


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
