"""Expert paging: a MoE bundle (DeepSeek-V2 / V3) under a memory budget below its weights.

Resident: attention, routers, shared experts, dense layers, norms and lm_head (the graph's segments,
moe_split.py); embedding rows are read per token. Routed experts are read from the weights file on
demand into an expert cache, one onnxruntime session per expert (its int4 matrices prepacked by
MatMulNBits, the fastest form onnxruntime's CPU provider computes them in), and dropped by the
cache's policy:

- `lru`: least recently used goes first (the baseline);
- `lfu`: the expert used least often goes first, with dynamic aging so the cache follows a change
  of workload (LFU-DA; ties: least recently used).

Per MoE layer: the segment before it gives the routing weights; reads of the missing experts are
issued at once (loader threads: read, then build), the cached ones compute meanwhile, each missing
one computes when it arrives. Where the step is small (decode), the next MoE layer's experts are
predicted by applying its router to the current hidden state and read ahead, while storage is not
the limit (prefetch "auto"); a prediction that proves wrong costs a read and is dropped, never cached. Stats count hits, prefetch hits, misses and
bytes read, so `bench` reports the hit rate and the storage bound the misses imply.

`io="mmap"`: the naive baseline — every expert use builds its session from an mmap of the weights
file, pages dropped after use, no cache and no read-ahead.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edge_sdk.errors import BundleError, ConfigError, MemoryBudgetError, RuntimeBackendError, require
from edge_sdk.paging_model import PAGE

from ..backends.base import check_step
from ..backends.fused.weights import EmbeddingRows
from ..backends.kv_cache import KVCache, ModelIO
from ..token_bucket import TokenBucket
from .moe_split import EMBED, MoENode, MoESplit, split
from .backend import EXTERNAL_DIR_KEY
from .expert_cache import POLICIES, ExpertCache
from .reader import READ_BURST, WeightsFile

log = logging.getLogger("edge_sdk.runtime")

PREFETCH_MAX_TOKENS = 4  # steps of up to this many tokens predict the next layer's experts (decode, speculation)
AUTO_PREFETCH_MAX_WAIT = 0.5  # prefetch "auto": read ahead while waiting for reads takes less of a step than this


@dataclasses.dataclass(frozen=True)
class ExpertPagingOptions:
    budget_bytes: int  # every weight the runtime holds: resident part + expert cache + reads in flight
    read_bytes_per_s: float | None = None  # storage throttle (emulated boards); None = what the disk gives
    policy: str = "lfu"
    prefetch: str = "auto"  # read-ahead of the next layer's predicted experts: "auto" | "on" | "off"
    io: str = "reader"  # "reader" | "mmap" (the naive baseline)
    loaders: int = 2  # threads that read and build experts
    direct_io: bool = True

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError(f"expert cache policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.prefetch not in ("auto", "on", "off"):
            raise ConfigError(f"expert read-ahead {self.prefetch!r} is not 'auto', 'on' or 'off'")
        if self.io not in ("reader", "mmap"):
            raise ConfigError(f"paging io {self.io!r} is not 'reader' or 'mmap'")
        if self.loaders < 1:
            raise ConfigError(f"expert loaders must be >= 1, got {self.loaders}")


# --- one expert: where it is in the weights file, its graph --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Byte ranges of expert e of one MoE layer: four slices of the layer's stacked tensors."""

    spans: tuple[tuple[int, int, int], ...]  # (tensor offset, bytes per expert, dtype code) x 4
    hidden: int
    inter: int
    block: int

    def ranges(self, e: int) -> list[tuple[int, int]]:
        return [(off + e * n, n) for off, n, _ in self.spans]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n, _ in self.spans)

    @property
    def held_bytes(self) -> int:
        """What an expert costs in memory once built: its int4 matrices as MatMulNBits prepacks them and
        twice its scales in fp32 (kept for the kernel, and the prepacked per-block data beside them):
        5.41 MB for a V2-Lite expert (benchmarks/bench_expert_paging.py prints the peak RSS against the
        budget)."""
        (_, gq, _), (_, gs, _), (_, dq, _), (_, ds, _) = self.spans
        return gq + 4 * gs + dq + 4 * ds


def resident_held_bytes(tensors: dict) -> int:
    """What onnxruntime's CPU provider holds for the resident segments' tensors, as measured (RssAnon,
    onnxruntime 1.32): each int4 matrix twice (as loaded, and prepacked into MatMulNBits), its scales
    in fp32 twice, every other fp16 tensor also as the fp32 copy its Cast folds into (470 MB for a
    V2-Lite cut of 5 layers; benchmarks/bench_expert_paging.py prints the peak RSS against the budget)."""
    total = 0
    for name, t in tensors.items():
        n = int(t["nbytes"])
        if t["dtype"] in ("int4", "uint4", "uint8"):
            total += 2 * n
        elif t["dtype"] == "float16":
            total += 4 * n if name.endswith(".scales") else 3 * n
        else:
            total += n
    return total


def expert_layout(tensors: dict, m: MoENode, n_experts: int, where: str) -> ExpertLayout:
    def spec(name, want_dtype, ndim):
        t = tensors.get(name)
        if t is None:
            raise BundleError(f"{where}: the weights table has no {name}", hint="re-convert the model")
        shape = [int(d) for d in t["shape"]]
        if t["dtype"] != want_dtype or len(shape) != ndim or shape[0] != n_experts:
            raise BundleError(f"{where}: {name} is {t['dtype']} {shape}, not the stacked {want_dtype} experts expected",
                              hint="re-convert the model")
        return int(t["offset"]), int(t["nbytes"]) // n_experts, shape

    gq = spec(m.gate_up[0], "uint8", 3)
    gs = spec(m.gate_up[1], "float16", 3)
    dq = spec(m.down[0], "uint8", 3)
    ds = spec(m.down[1], "float16", 3)
    two_i, half_h = gq[2][1], gq[2][2]
    hidden, inter = 2 * half_h, two_i // 2
    if dq[2][1:] != [hidden, inter // 2] or gs[2][1:] != [two_i, hidden // m.block_size] or ds[2][1:] != [hidden, inter // m.block_size]:
        raise BundleError(f"{where}: layer {m.layer}'s expert tensors do not agree in shape", hint="re-convert the model")
    return ExpertLayout(spans=((gq[0], gq[1], 2), (gs[0], gs[1], 10), (dq[0], dq[1], 2), (ds[0], ds[1], 10)),
                        hidden=hidden, inter=inter, block=m.block_size)


def expert_graph(layout: ExpertLayout, accuracy_level: int, alpha: float, beta: float) -> bytes:
    """x [N, hidden] -> y [N, hidden] = down(swiglu(gate_up(x))), gate/up rows interleaved as QMoE reads
    them; swiglu(g, l) = g * sigmoid(alpha * g) * (l + beta) (onnxruntime's MoE activation)."""
    onnx = require("onnx", "runtime")
    h, i, blk = layout.hidden, layout.inter, layout.block
    T, make = onnx.TensorProto, onnx.helper.make_node
    nodes = [make("MatMulNBits", ["x", "gu.B", "gu.s"], ["h"], domain="com.microsoft", K=h, N=2 * i, bits=4,
                  block_size=blk, accuracy_level=accuracy_level),
             make("Reshape", ["h", "pairs"], ["hp"]),
             make("Split", ["hp"], ["g", "l"], axis=-1, num_outputs=2)]
    g = "g"
    if alpha != 1.0:
        nodes.append(make("Mul", ["g", "alpha"], ["ga"]))
        g = "ga"
    nodes += [make("Sigmoid", [g], ["sg"]), make("Mul", ["g", "sg"], ["act"])]
    lin = "l"
    if beta != 0.0:
        nodes.append(make("Add", ["l", "beta"], ["lb"]))
        lin = "lb"
    nodes += [make("Mul", ["act", lin], ["m3"]), make("Reshape", ["m3", "flat"], ["m"]),
              make("MatMulNBits", ["m", "dn.B", "dn.s"], ["y"], domain="com.microsoft", K=i, N=h, bits=4,
                   block_size=blk, accuracy_level=accuracy_level)]
    inits = [onnx.numpy_helper.from_array(np.array([0, i, 2], np.int64), "pairs"),
             onnx.numpy_helper.from_array(np.array([0, i], np.int64), "flat"),
             onnx.numpy_helper.from_array(np.array(alpha, np.float32), "alpha"),
             onnx.numpy_helper.from_array(np.array(beta, np.float32), "beta")]
    for name, dt, dims in (("gu.B", T.UINT8, [2 * i, h // blk, blk // 2]), ("gu.s", T.FLOAT, [2 * i * (h // blk)]),
                           ("dn.B", T.UINT8, [h, i // blk, blk // 2]), ("dn.s", T.FLOAT, [h * (i // blk)])):
        p = T(name=name, data_type=dt, dims=dims)
        p.data_location = T.EXTERNAL  # given from memory (SessionOptions.add_initializer)
        e = p.external_data.add()
        e.key, e.value = "location", "model.weights"
        inits.append(p)
    graph = onnx.helper.make_graph(nodes, "expert", [onnx.helper.make_tensor_value_info("x", T.FLOAT, ["N", h])],
                                   [onnx.helper.make_tensor_value_info("y", T.FLOAT, ["N", h])], initializer=inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)],
                                   ir_version=10)
    return model.SerializeToString()


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """What the executor holds at most: resident tensors, the cache, reads in flight (the daemon's
    memory manager charges `peak_bytes`)."""

    resident_bytes: int
    cache_experts: int
    expert_held_bytes: int
    in_flight_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.cache_experts * self.expert_held_bytes + self.in_flight_bytes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"peak_bytes": self.peak_bytes}


@dataclasses.dataclass
class ExpertStats:
    uses: int = 0  # expert computations (a token's k experts in k MoE layers: k * layers per decode token)
    hits: int = 0  # found in the cache
    prefetch_hits: int = 0  # found read ahead (in flight or done)
    misses: int = 0  # read on demand
    reads: int = 0  # experts read from storage (demand and read-ahead)
    prefetch_issued: int = 0
    prefetch_wasted: int = 0  # read ahead, not used by the layer it was predicted for
    bytes_read: int = 0
    read_seconds: float = 0.0
    build_seconds: float = 0.0
    wait_seconds: float = 0.0  # the computing thread waiting for an expert

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hit_rate"] = round(self.hits / self.uses, 4) if self.uses else None
        d["served_without_wait_rate"] = round((self.hits + self.prefetch_hits) / self.uses, 4) if self.uses else None
        return d


class ExpertPagedBackend:
    """The `Backend` interface over a MoE bundle whose weights exceed the memory budget."""

    can_rollback = True  # host KV cache (kv_cache.KVCache): speculative decoding rolls it back
    kv_copies = 2

    def __init__(self, root: Path, manifest: dict, graph_path: Path, io: ModelIO, options: ExpertPagingOptions, *,
                 threads: int, accuracy_level: int = 4):
        self.ort = ort = require("onnxruntime", "runtime")
        self.root, self.options, self.threads = Path(root), options, threads
        weights = manifest.get("weights") or {}
        self.tensors = weights.get("tensors") or {}
        where = str(self.root)
        self.split: MoESplit = split(graph_path, where)
        moe_cfg = (manifest.get("architecture") or {}).get("moe") or {}
        n = moe_cfg.get("n_routed_experts")
        self.n_experts = n if isinstance(n, int) and not isinstance(n, bool) else 0
        if self.n_experts < 1:
            raise BundleError(f"{where}: the manifest does not say how many routed experts the model has", hint="re-convert the model")
        self.moe = self.split.moe
        self.layouts = [expert_layout(self.tensors, m, self.n_experts, where) for m in self.moe]
        lay = self.layouts[0]
        if any((x.hidden, x.inter, x.block) != (lay.hidden, lay.inter, lay.block) for x in self.layouts):
            raise BundleError(f"{where}: the MoE layers' experts differ in shape", hint="run the bundle without --memory-budget")
        k = max(m.k for m in self.moe)
        # budget: resident tensors (all but the routed experts and the embedding table) + cache + reads in flight
        expert_names = {n for m in self.moe for n in (*m.gate_up, *m.down)}
        self.resident_bytes = resident_held_bytes({n: t for n, t in self.tensors.items() if n not in expert_names and n != EMBED})
        self.entry_bytes = lay.held_bytes
        self.in_flight = 0 if options.io == "mmap" else max(k, 2 * options.loaders)
        # demand reads and read-ahead in flight: each a read buffer and a session being built
        room = options.budget_bytes - self.resident_bytes - 2 * self.in_flight * (lay.held_bytes + lay.nbytes)
        self.capacity = 0 if options.io == "mmap" else room // self.entry_bytes
        total = len(self.moe) * self.n_experts
        if options.io != "mmap" and self.capacity < k:
            need = self.resident_bytes + k * self.entry_bytes + 2 * self.in_flight * (lay.held_bytes + lay.nbytes)
            raise MemoryBudgetError(f"a memory budget of {options.budget_bytes:,} bytes leaves room for {max(self.capacity, 0)} "
                                    f"routed experts beside the {self.resident_bytes:,} resident bytes; a token needs {k}",
                                    hint=f"raise the memory budget to at least {need:,} bytes")
        self.capacity = min(self.capacity, total)
        self.plan = ExpertPlan(self.resident_bytes, self.capacity, self.entry_bytes,
                               2 * self.in_flight * (lay.held_bytes + lay.nbytes))

        so = self._options(accuracy_level)
        so.add_session_config_entry(EXTERNAL_DIR_KEY, str(self.root.absolute()))
        try:
            self.segments = [ort.InferenceSession(s.model, so, providers=["CPUExecutionProvider"]) for s in self.split.segments]
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime could not load the segments of {graph_path.name}: {exc}") from exc
        self.provider = "CPUExecutionProvider"
        self.io = io
        self._kv_names = {}
        for i in range(io.num_layers):
            for kind, n in (("key", 0), ("value", 1)):
                self._kv_names[io.past_name.format(i=i, kind=kind)] = ("past", i, n)
                self._kv_names[io.present_name.format(i=i, kind=kind)] = ("present", i, n)
        self.embedding = EmbeddingRows(self.root, manifest)
        throttle = TokenBucket(options.read_bytes_per_s, READ_BURST) if options.read_bytes_per_s else None
        needed = max(int(t["offset"]) + int(t["nbytes"]) for t in self.tensors.values())
        self.file = WeightsFile(self.root / weights.get("file", "model.weights"), needed, throttle, options.direct_io)
        # MatMulNBits at the runtime's accuracy level, as every other int4 matrix (1: fp32 activations, what
        # the bundle's QMoE node computes; 4, the default: int8 activations, ~3x faster per expert here)
        self.expert_level = accuracy_level
        self.graphs = {(m.alpha, m.beta): expert_graph(lay, self.expert_level, m.alpha, m.beta) for m in self.moe}
        self.routers = self._routers() if options.prefetch != "off" and options.io != "mmap" else None
        self.wait_share = 0.0  # moving average of the share of a step spent waiting for reads (prefetch "auto")

        self.stats = ExpertStats()
        self.cache = ExpertCache(self.capacity, options.policy)
        self.pending: dict = {}  # key -> Future of a read-ahead
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(options.loaders, thread_name_prefix="edge-sdk-expert-load")
        self.mapped = None
        if options.io == "mmap":
            self.mapped = mmap.mmap(self.file.fd, 0, prot=mmap.PROT_READ)
            self.map_view = np.frombuffer(self.mapped, np.uint8)
        self.owns_weights = self._check_prepack_owns()
        log.info("paging: %d MoE layers x %d routed experts streamed from %s (%s); cache of %d experts (%s, %s bytes each), "
                 "%s resident bytes, budget %s bytes", len(self.moe), self.n_experts, self.file.path.name,
                 "mmap" if self.mapped is not None else self.file.mode, self.capacity, options.policy,
                 f"{self.entry_bytes:,}", f"{self.resident_bytes:,}", f"{options.budget_bytes:,}")

    # --- sessions ------------------------------------------------------------------------------------------------

    def _options(self, accuracy_level: int):
        so = self.ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return so

    def _build(self, j: int, parts: list[np.ndarray]):
        """Expert session of MoE layer j from its four slices (uint8 views); scales widened to fp32."""
        lay, m = self.layouts[j], self.moe[j]
        i, h, blk = lay.inter, lay.hidden, lay.block
        weights = {"gu.B": parts[0].reshape(2 * i, h // blk, blk // 2), "gu.s": parts[1].view(np.float16).astype(np.float32),
                   "dn.B": parts[2].reshape(h, i // blk, blk // 2), "dn.s": parts[3].view(np.float16).astype(np.float32)}
        so = self._options(self.expert_level)
        # one thread: an expert computes a few tokens at a time, and the loaders build on the other cores;
        # no arena: it holds ~1 MB per session beyond the weights
        so.intra_op_num_threads = 1
        so.enable_cpu_mem_arena = False
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.add_session_config_entry(EXTERNAL_DIR_KEY, str(self.file.path.parent))
        values = []
        for name, w in weights.items():
            values.append(self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w)))
            so.add_initializer(name, values[-1])
        try:
            sess = self.ort.InferenceSession(self.graphs[(m.alpha, m.beta)], so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime could not build an expert of layer {m.layer}: {exc}") from exc
        # onnxruntime reads the scales from these at run time, and the int4 matrices too unless MatMulNBits
        # prepacked its own copy of them (checked at load)
        owned = getattr(self, "owns_weights", False)
        sess._edge_sdk_keep = [v for n, v in zip(weights, values) if not (owned and n.endswith(".B"))]
        return sess

    def _read(self, j: int, e: int) -> list[np.ndarray]:
        """Expert e of MoE layer j read from storage: one aligned read covering each of its four slices."""
        out = []
        for off, n in self.layouts[j].ranges(e):
            start = off - off % PAGE
            length = -(-(off + n - start) // PAGE) * PAGE
            raw = np.empty(length + PAGE, np.uint8)
            buf = raw[(-raw.ctypes.data) % PAGE:][:length]
            t0 = time.perf_counter()
            self.file.read_into(buf, start, min(length, self.file.size - start))
            with self._lock:
                self.stats.bytes_read += length
                self.stats.read_seconds += time.perf_counter() - t0
            out.append(buf[off - start:off - start + n])
        with self._lock:
            self.stats.reads += 1
        return out

    def _load(self, j: int, e: int):
        parts = self._read(j, e)
        t0 = time.perf_counter()
        sess = self._build(j, parts)
        with self._lock:
            self.stats.build_seconds += time.perf_counter() - t0
        return sess

    def _mapped(self, j: int, e: int):
        """The naive baseline: the session built straight from the mapped file, its pages dropped after."""
        ranges = self.layouts[j].ranges(e)
        parts = [self.map_view[off:off + n] for off, n in ranges]
        t0 = time.perf_counter()
        sess = self._build(j, parts)
        with self._lock:
            self.stats.build_seconds += time.perf_counter() - t0
            self.stats.bytes_read += sum(n for _, n in ranges)
        for off, n in ranges:
            start = off - off % PAGE
            length = -(-(off + n - start) // PAGE) * PAGE
            self.mapped.madvise(mmap.MADV_DONTNEED, start, min(length, len(self.mapped) - start))
            os.posix_fadvise(self.file.fd, start, length, os.POSIX_FADV_DONTNEED)
        return sess

    def _check_prepack_owns(self) -> bool:
        """Whether an expert session keeps computing the same after the int4 matrices it was built from are
        overwritten (MatMulNBits prepacked its own copy): then those read buffers are let go."""
        if self.options.io == "mmap":
            return False
        parts = [np.array(p) for p in self._read(0, 0)]
        with self._lock:
            self.stats = ExpertStats()
        self.owns_weights = False
        sess = self._build(0, parts)
        x = np.random.default_rng(0).standard_normal((1, self.layouts[0].hidden)).astype(np.float32)
        before = sess.run(None, {"x": x})[0]
        parts[0][:] = 0x5A  # the int4 matrices only: the scales are always kept
        parts[2][:] = 0x5A
        after = sess.run(None, {"x": x})[0]
        return bool(np.array_equal(before, after))

    # --- read-ahead --------------------------------------------------------------------------------------------

    def _routers(self) -> list | None:
        """Per MoE layer j but the last: (the router weight of layer j + 1 [hidden, E] with its norm weight
        over layer j's folded in, its correction bias or None), so that a prediction is one matmul on
        layer j's normalised input."""
        layers = []
        for m in self.moe:
            p = f"model.layers.{m.layer}"
            w = self._tensor(f"{p}.mlp.gate.weight")
            ln = self._tensor(f"{p}.post_attention_layernorm.weight")
            if w is None or ln is None:
                return None
            if w.shape[0] != self.layouts[0].hidden:
                w = w.T
            layers.append((w, ln, self._tensor(f"{p}.mlp.gate.e_score_correction_bias")))
        out = []
        for (_, ln0, _), (w1, ln1, bias) in zip(layers, layers[1:]):
            scale = np.divide(ln1, ln0, out=np.zeros_like(ln1), where=ln0 != 0)
            out.append((np.ascontiguousarray(scale[:, None] * w1, np.float32), bias))
        return out

    def _tensor(self, name: str) -> np.ndarray | None:
        t = self.tensors.get(name)
        if t is None or t["dtype"] not in ("float16", "float32"):
            return None
        data = self.file.pread(int(t["nbytes"]), int(t["offset"]))
        return np.frombuffer(data, np.dtype(t["dtype"])).reshape([int(d) for d in t["shape"]]).astype(np.float32)

    def _predict(self, j: int, x: np.ndarray) -> set[int]:
        """Experts of MoE layer j + 1 predicted from layer j's normalised input x: the residual stream
        changes little from one layer to the next, so its router applied to x (renormalised with its own
        norm weight) picks most of the experts it will pick."""
        w, bias = self.routers[j]
        logits = x @ w  # [N, E]
        if bias is not None:
            logits = 1 / (1 + np.exp(-logits)) + bias
        k = self.moe[j + 1].k
        top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
        return set(int(e) for e in top.ravel())

    # --- compute -------------------------------------------------------------------------------------------------

    def _experts(self, j: int, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """sum over each token's chosen experts of weight * expert(x): QMoE's output, computed from the cache."""
        x = np.ascontiguousarray(x, np.float32)
        w = np.asarray(w, np.float32)
        out = np.zeros_like(x)
        chosen = [int(e) for e in np.nonzero(w.max(axis=0) > 0)[0]]
        if self.mapped is not None:
            for e in chosen:
                self._apply(self._mapped(j, e), e, x, w, out)
                self.stats.uses += 1
                self.stats.misses += 1
            return out
        layer = self.moe[j].layer
        keys = {(layer, e) for e in chosen}
        # read-ahead for this layer that the router did not choose: cancelled before the demand reads queue
        for key in [k for k in self.pending if k[0] == layer and k not in keys]:
            self.pending.pop(key).cancel()
            self.stats.prefetch_wasted += 1
        ready, waiting = [], []
        for e in chosen:
            key = (layer, e)
            sess = self.cache.get(key)
            if sess is not None:
                self.stats.hits += 1
                ready.append((e, sess))
            else:
                fut = self.pending.pop(key, None)
                if fut is not None:
                    self.stats.prefetch_hits += 1
                else:
                    self.stats.misses += 1
                waiting.append((e, fut))
        self.stats.uses += len(chosen)
        # demand reads first, at most `in_flight` at once; then the next layer's read-ahead
        queue = collections.deque(waiting)
        inflight: collections.deque = collections.deque()

        def refill():
            while queue and len(inflight) < self.in_flight:
                e, fut = queue.popleft()
                inflight.append((e, fut if fut is not None else self.pool.submit(self._load, j, e)))

        refill()
        if self.routers is not None and j + 1 < len(self.moe) and x.shape[0] <= PREFETCH_MAX_TOKENS and self._read_ahead():
            nxt = self.moe[j + 1].layer
            for e in sorted(self._predict(j, x)):
                key = (nxt, e)
                if len(self.pending) < self.in_flight and key not in self.cache and key not in self.pending:
                    self.pending[key] = self.pool.submit(self._load, j + 1, e)
                    self.stats.prefetch_issued += 1
        for e, sess in ready:
            self._apply(sess, e, x, w, out)
        while inflight:
            e, fut = inflight.popleft()
            t0 = time.perf_counter()
            sess = fut.result()
            self.stats.wait_seconds += time.perf_counter() - t0
            refill()
            self._apply(sess, e, x, w, out)
            self.cache.put((layer, e), sess, protected=keys)
        return out

    def _read_ahead(self) -> bool:
        """Whether to read ahead now. "auto": while storage is not the limit. Once the computing thread
        spends over half of its steps waiting for reads, storage is busy all the time and a read ahead
        only reorders reads, a wrong one costs storage time: only demand reads then."""
        return self.options.prefetch == "on" or self.wait_share < AUTO_PREFETCH_MAX_WAIT

    def _apply(self, sess, e: int, x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
        rows = np.nonzero(w[:, e] > 0)[0]
        try:
            y = sess.run(None, {"x": x[rows] if len(rows) != x.shape[0] else x})[0]
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime failed running expert {e}: {exc}") from exc
        out[rows] += w[rows, e:e + 1] * y

    # --- Backend interface ----------------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.io, batch, capacity)

    def forward(self, input_ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None = None) -> np.ndarray:
        ids, mask = check_step(input_ids, cache, new_mask)
        start, waited = time.perf_counter(), self.stats.wait_seconds
        attn, pos = cache.step_inputs(mask)
        values = {"input_ids": ids, "attention_mask": attn, "position_ids": pos,
                  self.split.embedding: np.ascontiguousarray(self.embedding(ids, np.float32))}
        dt = np.dtype(self.io.kv_dtype)
        new = ids.shape[1]
        for s, (sess, seg) in enumerate(zip(self.segments, self.split.segments)):
            b = sess.io_binding()
            for name in seg.inputs:
                kv = self._kv_names.get(name)
                if kv is not None:
                    ptr, shape = cache.binding(kv[1], kv[2])
                    b.bind_input(name, cache.device, 0, dt, list(shape), ptr)
                else:
                    b.bind_cpu_input(name, values[name])
            # host outputs bound first: get_outputs() follows binding order
            host_out = [n for n in seg.outputs if n not in self._kv_names]
            for name in host_out:
                b.bind_output(name, "cpu")
            for name in seg.outputs:
                kv = self._kv_names.get(name)
                if kv is not None:
                    ptr, shape = cache.binding(kv[1], kv[2], new)
                    b.bind_output(name, cache.device, 0, dt, list(shape), ptr)
            try:
                sess.run_with_iobinding(b)
            except Exception as exc:
                raise RuntimeBackendError(f"onnxruntime failed running segment {s} of the paged MoE graph: {exc}") from exc
            outs = b.get_outputs()
            values.update({n: np.ascontiguousarray(o.numpy()) for n, o in zip(host_out, outs)})
            if s < len(self.moe):
                m = self.moe[s]
                values[m.out] = self._experts(s, values[m.x], values[m.w])
        cache.advance(mask)
        if new <= PREFETCH_MAX_TOKENS:
            share = (self.stats.wait_seconds - waited) / max(time.perf_counter() - start, 1e-9)
            self.wait_share = 0.8 * self.wait_share + 0.2 * share
        return np.asarray(values["logits"], dtype=np.float32)

    def describe(self) -> dict:
        return {"backend": "onnxruntime-expert-paged", "provider": self.provider, "threads": self.threads,
                "accuracy_level": self.expert_level, "kv_dtype": self.io.kv_dtype,
                "io": "mmap" if self.mapped is not None else self.file.mode,
                "read_bytes_per_s": self.options.read_bytes_per_s,
                "paging": {"moe_layers": len(self.moe), "routed_experts": self.n_experts, "cache_experts": self.capacity,
                           "policy": self.options.policy, "prefetch": self.options.prefetch if self.routers is not None else "off",
                           "expert_bytes": self.layouts[0].nbytes, "expert_held_bytes": self.entry_bytes,
                           "resident_bytes": self.resident_bytes, "budget_bytes": self.options.budget_bytes,
                           "peak_bytes": self.plan.peak_bytes,
                           "stats": self.stats.to_dict()}}

    def close(self) -> None:
        pool, self.pool = getattr(self, "pool", None), None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if getattr(self, "mapped", None) is not None:
            del self.map_view
            self.mapped.close()
            self.mapped = None
        f = getattr(self, "file", None)
        if f is not None and f.fd is not None:
            f.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

