"""Native TensorRT engine build on the target: `edge-sdk engine build BUNDLE`.

Written against TensorRT 10's Python API (`tensorrt.Builder`, `OnnxParser`, STRONGLY_TYPED
networks, `IOptimizationProfile`, `ITimingCache`, `IBuilderConfig.set_memory_pool_limit`,
`build_serialized_network`, `IProgressMonitor`). The `trt` module is passed in, so everything
around the calls is tested here without TensorRT; the calls themselves run only on a device.

DeepSeek-V2 / V3 bundles (MoE): the parser has no importer for the graph's com.microsoft QMoE, so the
build parses a rewrite of that graph written into a scratch directory from the bundle's own weights
(moe.py: one If per routed expert over 2-D INT4 DequantizeLinear -> Gemm); unverified on a device.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from edge_sdk.errors import ConfigError, RuntimeBackendError

from .. import engine_cache as ec
from ..kv_cache import ModelIO
from . import moe

Shape = tuple[int, ...]


@dataclass(frozen=True)
class EngineBuildSettings:
    max_batch: int = 1
    max_prompt: int = 512  # longest prefill chunk
    max_seq_len: int = 2048  # KV capacity: past + new tokens
    opt_batch: int = 1
    opt_prompt: int = 128
    opt_past: int = 512
    workspace_mb: int = 1024  # builder scratch memory (from the memory plan)
    optimization_level: int = 3  # IBuilderConfig.builder_optimization_level, 0-5
    graph: str = "fp16"  # which bundle graph: fp16 activations for the GPU

    def __post_init__(self):
        if not (1 <= self.opt_batch <= self.max_batch):
            raise ConfigError(f"need 1 <= opt_batch ({self.opt_batch}) <= max_batch ({self.max_batch})")
        if not (1 <= self.opt_prompt <= self.max_prompt <= self.max_seq_len):
            raise ConfigError(f"need 1 <= opt_prompt ({self.opt_prompt}) <= max_prompt ({self.max_prompt}) <= max_seq_len ({self.max_seq_len})",
                              hint="lower --max-prompt or raise --max-seq-len")
        if not (0 <= self.opt_past < self.max_seq_len):
            raise ConfigError(f"opt_past ({self.opt_past}) must be below max_seq_len ({self.max_seq_len})")
        if self.workspace_mb < 16:
            raise ConfigError(f"workspace_mb must be >= 16, got {self.workspace_mb}")
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"optimization_level must be 0-5, got {self.optimization_level}")
        if self.graph not in ("fp16", "fp32"):
            raise ConfigError(f"graph must be fp16 or fp32, got {self.graph!r}")


PROFILE_NAMES = ("prefill", "chunk", "decode")
TRT_INT4_BLOCKS = (64, 128)  # the only INT4 block sizes TensorRT's DequantizeLinear takes


def profiles(s: EngineBuildSettings, io: ModelIO) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """Three optimization profiles, (min, opt, max) shapes per input, in PROFILE_NAMES order:

    - prefill: seq 1..max_prompt on an empty past (the first chunk of a prompt);
    - chunk: seq 1..max_prompt on a past of 1..max_seq_len-1 (the next chunks of a long prompt);
    - decode: seq 1 on a past of 0..max_seq_len-1.

    Every (seq, past) with seq <= max_prompt and past + seq <= max_seq_len lies in one of them. Each of
    min, opt and max is itself a consistent step (attention_mask = past + seq), so the chunk profile's
    largest mask is max_seq_len - 1 + max_prompt: the runtime never asks for more than max_seq_len.
    """
    h, d, b = io.num_kv_heads, io.head_dim, (1, s.opt_batch, s.max_batch)
    top = s.max_seq_len

    def phase(seq: Shape, past: Shape) -> dict:
        shapes = {
            "input_ids": tuple((b[i], seq[i]) for i in range(3)),
            "position_ids": tuple((b[i], seq[i]) for i in range(3)),
            "attention_mask": tuple((b[i], past[i] + seq[i]) for i in range(3)),
        }
        for layer in range(io.num_layers):
            for kind in ("key", "value"):
                shapes[io.past_name.format(i=layer, kind=kind)] = tuple((b[i], h, past[i], d) for i in range(3))
        return shapes

    return [phase((1, s.opt_prompt, s.max_prompt), (0, 0, 0)),
            phase((1, s.opt_prompt, s.max_prompt), (1, max(1, s.opt_past), top - 1)),
            phase((1, 1, 1), (0, s.opt_past, top - 1))]


def limits(s: EngineBuildSettings) -> dict:
    """What engine.json records and the runtime caps itself to."""
    return {"max_batch": s.max_batch, "max_prompt": s.max_prompt, "max_seq_len": s.max_seq_len}


def check_bundle(manifest: dict, s: EngineBuildSettings, root: Path) -> str:
    """The graph file this build parses; refuses what TensorRT cannot build (no silent fp32 fallback)."""
    group = int(manifest.get("quantization", {}).get("group_size", 128))
    if group not in TRT_INT4_BLOCKS:
        raise ConfigError(f"{root}: INT4 group size {group}; TensorRT runs INT4 blocks of 64 or 128 only",
                          hint="convert the model again with --group-size 128 (or 64), or use provider='cpu'")
    if moe.is_moe(manifest):  # the source of moe.py's rewrite, whose routed experts run in s.graph's precision
        return manifest["graphs"]["fp32"]["file"]
    entry = manifest["graphs"].get(s.graph)
    if not entry:
        raise ConfigError(f"{root}: the bundle has no {s.graph} graph (TensorRT runs INT4 weights with fp16 activations)",
                          hint="convert with --fp16-graph, or build with --graph fp32 (slower, fp32 activations)")
    return entry["file"]


@contextmanager
def _graph_to_parse(root: Path, manifest: dict, s: EngineBuildSettings, cache_root: Path, report: Callable[[str], None]):
    """The graph file the parser reads: the bundle's own, or for an MoE bundle its TensorRT rewrite in a
    scratch directory under cache_root that lasts until the engine is written."""
    graph = check_bundle(manifest, s, root)
    if not moe.is_moe(manifest):
        yield root / graph, None
        return
    expert_dtype = "float16" if s.graph == "fp16" else "float32"
    cache_root.mkdir(parents=True, exist_ok=True)
    need, free = moe.scratch_bytes(manifest), shutil.disk_usage(cache_root).free
    if need > free:
        raise ConfigError(f"{cache_root}: the TensorRT build of this MoE bundle needs {need >> 20} MiB of scratch, {free >> 20} MiB free",
                          hint="free space there, or pass --engine-cache on a larger disk")
    scratch = Path(tempfile.mkdtemp(prefix=".moe-build-", dir=cache_root))
    try:
        report(f"rewriting {graph}'s routed experts for TensorRT ({need >> 20} MiB of INT4 experts into {scratch.name})")
        yield moe.write_graph(root, graph, manifest, scratch, expert_dtype), {
            "formulation": "If per routed expert, INT4 DequantizeLinear -> Gemm", "source_graph": graph, "activation_dtype": expert_dtype}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def engine_key(board: str, trt_version: str, bundle: Path, s: EngineBuildSettings) -> ec.EngineKey:
    return ec.EngineKey(board, trt_version, ec.bundle_hash(bundle), ec.settings_hash(asdict(s)))


def _progress_monitor(trt, report: Callable[[str], None]):
    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            report(f"{'  ' if parent_phase else ''}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Progress()


def _parse_and_build(trt, graph: Path, s: EngineBuildSettings, io: ModelIO, timing_path: Path, target: str,
                     report: Callable[[str], None]) -> tuple[bytes, float]:
    """The TensorRT calls: parse, profiles, workspace, timing cache, build -> (serialized engine, seconds)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed: precision comes from the graph (fp16 activations, INT4 DequantizeLinear weights)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    report(f"parsing {graph.name}")
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeBackendError(f"TensorRT could not parse {graph.name}: {errors}",
                                  hint="the TensorRT on this device may be too old for opset-21 INT4 DequantizeLinear (needs 10.x)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mb << 20)
    config.builder_optimization_level = s.optimization_level
    for prof in profiles(s, io):
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    monitor = _progress_monitor(trt, report)  # must outlive the build
    config.progress_monitor = monitor
    report(f"building engine for {target} (this takes minutes)")
    start = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeBackendError("TensorRT failed to build the engine (see the TensorRT log above)",
                                  hint="lower --max-seq-len / --max-batch or raise --workspace-mb")
    ec.write_atomic(timing_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), round(time.monotonic() - start, 1)


def build_engine(bundle: str | Path, manifest: dict, board: str, trt, *, settings: EngineBuildSettings | None = None,
                 cache_root: Path, force: bool = False, report: Callable[[str], None] = print) -> tuple[Path, bool]:
    """Build (or find) the engine for this bundle, board and TensorRT; return (engine path, built now?)."""
    s = settings or EngineBuildSettings()
    root = Path(bundle)
    io = ModelIO.from_manifest(manifest)
    key = engine_key(board, trt.__version__, root, s)
    cached = ec.lookup(cache_root, key)
    if cached and not force:
        report(f"engine up to date: {cached}")
        return cached, False
    with _graph_to_parse(root, manifest, s, cache_root, report) as (graph, moe_experts):
        serialized, seconds = _parse_and_build(trt, graph, s, io, key.timing_cache(cache_root), f"{board} with TensorRT {trt.__version__}", report)
    meta = {"tensorrt_version": trt.__version__, "board": board, "bundle": str(root.absolute()),
            "bundle_hash": key.bundle_hash, "settings": asdict(s), "graph": graph.name, "graph_kind": s.graph,
            "limits": limits(s), "profile_names": list(PROFILE_NAMES),
            "profiles": [{n: [list(x) for x in v] for n, v in p.items()} for p in profiles(s, io)],
            "build_seconds": seconds} | ({"moe_experts": moe_experts} if moe_experts else {})
    path = ec.write_entry(cache_root, key, bytes(serialized), meta)
    report(f"engine written: {path} ({meta['build_seconds']} s)")
    return path, True
