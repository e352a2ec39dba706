"""Runtime settings: one validated dataclass, built from `edge_sdk.load(...)` keywords or CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from edge_sdk.errors import ConfigError

PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt-ep", "tensorrt")
GRAPH_CHOICES = ("auto", "fused", "standard")


@dataclass(frozen=True)
class RuntimeOptions:
    board: str | None = None  # board the bundle will run on (checked against the manifest)
    emulate: str | None = None  # emulated board name (same effect on the runtime as `board`)
    root: str | None = None  # filesystem root of the board (platform layer)
    provider: str = "auto"  # auto | cpu | cuda | tensorrt-ep | tensorrt (native engine)
    threads: int | None = None  # intra-op threads; None = all cores
    accuracy_level: int = 4  # MatMulNBits: 1 exact fp32 activations ... 4 int8 activations
    huge_pages: bool = True  # back the session's weights with transparent huge pages (runtime/backends/hugepages.py)
    graph: str = "auto"  # CPU provider: "fused" onnxruntime contrib-op graph built from the bundle, or its "standard" graph
    max_batch: int = 1
    max_seq_len: int | None = None  # KV capacity per sequence; None = min(4096, model max)
    public_key: str | None = None  # trusted ed25519 key: manifest.sig must verify against it
    engine_cache_dir: str | None = None  # default: <bundle parent>/.edge-sdk-engines
    kv_budget_bytes: int | None = None  # KV cache limit; None = from the board's memory plan when a board is given
    memory_budget: int | str | None = None  # weights memory, bytes or "50%"; over it layers stream from storage (docs/paging.md)
    expert_cache: str = "lfu"  # MoE bundles over the budget: routed experts paged through an "lfu" or "lru" cache
    log_provider: bool = True

    def __post_init__(self):
        if self.provider not in PROVIDER_CHOICES:
            raise ConfigError(f"provider {self.provider!r} is not one of {', '.join(PROVIDER_CHOICES)}",
                              hint="'auto' picks TensorRT EP, then CUDA EP, then CPU by availability")
        if self.graph not in GRAPH_CHOICES:
            raise ConfigError(f"graph {self.graph!r} is not one of {', '.join(GRAPH_CHOICES)}",
                              hint="'auto' runs the fused graph on the CPU provider and the bundle's graph elsewhere")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}", hint="leave it unset to use all cores")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level must be 0-4, got {self.accuracy_level}",
                              hint="1 = exact fp32 activations, 4 = int8 activations (fastest)")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes <= 0:
            raise ConfigError(f"kv_budget_bytes must be > 0, got {self.kv_budget_bytes}")
        if self.memory_budget is not None:
            from edge_sdk.paging_model import parse_budget

            parse_budget(self.memory_budget, 1)
        if self.expert_cache not in ("lfu", "lru"):
            raise ConfigError(f"expert_cache {self.expert_cache!r} is not 'lfu' or 'lru'",
                              hint="'lfu' keeps the experts used most often (with aging), 'lru' the ones used last")
        if self.board and self.emulate and self.board != self.emulate:
            raise ConfigError(f"board {self.board!r} and emulate {self.emulate!r} disagree", hint="pass one of them")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "RuntimeOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown load option(s): {', '.join(unknown)}", hint=f"known options: {', '.join(sorted(known))}")
        return cls(**kwargs)

    @property
    def target_board(self) -> str | None:
        return self.board or self.emulate

    @property
    def num_threads(self) -> int:
        if self.threads:
            return self.threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def engine_root(self, bundle: Path) -> Path:
        return Path(self.engine_cache_dir) if self.engine_cache_dir else Path(bundle).absolute().parent / ".edge-sdk-engines"
