"""Layer-streamed executor over the fused graph (runtime/backends/fused/graph.py), for onnxruntime's CPU provider.

The paged layers are read from the fused sidecar file, already in MatMulNBits' layout, by a reader
thread (large aligned reads into raw slots); builder threads then build each layer's session from its
slot (onnxruntime prepacks the int4 weights there) while the computing thread runs other layers. The
computing thread runs the session and drops it. Resident layers and the tail (final norm, lm_head) are
sessions built once at load from the same file. Every session is the same single-layer graph; only
the weights it is given differ, so paged and resident layers compute exactly alike.

Why a session per paged layer: a layer whose int4 weights are graph inputs cannot use onnxruntime's
prepacked MatMulNBits kernel (it dequantizes the whole matrix every call). A build prepacks once per
use, far cheaper than dequantizing on every call (docs/paging.md "The fused executor" has the times).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import weakref
from pathlib import Path

import numpy as np

from edge_sdk.errors import BundleError, EdgeSDKError, RuntimeBackendError, require

from ..backends import fused as fg
from ..backends.base import check_step, one_token_at_a_time_over_a_past
from ..backends.kv_cache import KVCache, ModelIO, SharedKVCache
from . import heap
from .backend import PagedBackend, PagingOptions
from ..token_bucket import TokenBucket
from .buffers import Ledger
from edge_sdk.paging_model import MEASURED_SHAPES, BuildProbe, PagingPlan, page_round, plan_pipelined
from .reader import READ_BURST, LayerReader, WeightsFile

log = logging.getLogger("edge_sdk.runtime")

BUILDER_THREADS = "edge-sdk-layer-build"
NP = {"uint8": np.uint8, "float32": np.float32, "float16": np.float16}


def layer_roles(tensors: dict, i: int) -> dict[str, dict]:
    prefix = f"model.layers.{i}."
    return {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}


def layer_spans(tensors: dict, layers: int) -> list[tuple[int, int]]:
    """(offset, nbytes) of every layer's tensors in the sidecar (contiguous, page aligned)."""
    out = []
    for i in range(layers):
        roles = layer_roles(tensors, i)
        if not roles:
            raise BundleError(f"the fused sidecar has no tensors for layer {i}", hint="delete the engine cache entry to rebuild it")
        start = min(t["offset"] for t in roles.values())
        end = max(t["offset"] + t["nbytes"] for t in roles.values())
        out.append((start, end - start))
    return out


def sidecar_fixed_bytes(tensors: dict) -> int:
    """Resident outside the layers: final norm and lm_head."""
    return sum(page_round(t["nbytes"]) for n, t in tensors.items() if not n.startswith(("model.layers.", "rope.")))


def plan_for(tensors: dict, layers: int, budget: int, probe: BuildProbe | None = None) -> PagingPlan:
    """The plan the decode model predicts fastest from `probe`; without one, the most pipelining the
    budget allows (plan.plan_pipelined)."""
    return plan_pipelined([n for _, n in layer_spans(tensors, layers)], sidecar_fixed_bytes(tensors), budget, probe)


class SessionPipeline(LayerReader):
    """Reads paged layers into raw slots (the LayerReader thread, large aligned reads) and builds each
    layer's session on a small pool of builder threads (onnxruntime prepacks the weights there), at
    most `max_sessions` alive at once. get(layer) hands the next session out in forward order; done()
    after it has run and been dropped. With `release_early` (the platform's MatMulNBits keeps its own
    prepacked copy, checked at load), a slot is reused as soon as its session is built."""

    def __init__(self, wf: WeightsFile, spans: list[tuple[int, int]], order: tuple[int, ...], slots: list[np.ndarray],
                 build, *, max_sessions: int, builders: int, release_early: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.spans, self.build, self.release_early, self.builders = spans, build, release_early, max(1, builders)
        self.sessions = threading.Semaphore(max_sessions)
        self.error: BaseException | None = None
        self.pool = ThreadPoolExecutor(self.builders, thread_name_prefix=BUILDER_THREADS)
        super().__init__(wf, dict(enumerate(spans)), order, slots)

    def _handoff(self, layer: int, slot: int) -> bool:
        while not self.sessions.acquire(timeout=0.1):
            if self.stop.is_set():
                return False
        try:
            job = self.pool.submit(self._build, layer, slot)
        except RuntimeError:  # the pool was shut down: closing
            return False
        self.ready.put((layer, slot, job))
        return True

    def _build(self, layer: int, slot: int):
        try:
            return self.build(layer, self.slots[slot], self.spans[layer][0])
        finally:
            if self.release_early:
                self.free.put(slot)

    def get(self, layer: int):
        """(token, session) of `layer`; pass the token to done() once the session is dropped."""
        while True:
            if self.error is not None:
                raise self.error
            got, slot, job = self.ready.get()
            try:
                if isinstance(job, BaseException):
                    raise job
                sess = job.result()
            except BaseException as exc:
                if isinstance(exc, EdgeSDKError):
                    self.error = exc
                else:
                    self.error = BundleError(f"streaming layer {got} from {self.wf.path} failed: {exc}",
                                             hint="check the storage device")
                    self.error.__cause__ = exc
                raise self.error
            if got == layer:
                return slot, sess
            del sess  # left over from a forward pass that stopped early
            self.done(slot)

    def done(self, slot: int) -> None:
        self.sessions.release()
        if not self.release_early:
            self.free.put(slot)

    def close(self) -> None:
        self.stop.set()
        self.sessions.release()
        # the last reference to the backend may be dropped inside a build: a builder cannot wait for itself
        in_builder = threading.current_thread().name.startswith(BUILDER_THREADS)
        self.pool.shutdown(wait=not in_builder, cancel_futures=True)
        super().close()


class FusedPagedBackend:
    def __init__(self, root: Path, manifest: dict, io: ModelIO, options: PagingOptions, fused: fg.FusedGraph, *,
                 providers: list, threads: int, accuracy_level: int, huge_pages: bool = True):
        ort = require("onnxruntime", "runtime")
        self.ort, self.root, self.options = ort, Path(root), options
        self.shape = s = fg.Shape.from_manifest(manifest)
        meta = fused.metadata()
        self.tensors = meta["tensors"]
        self.spans = layer_spans(self.tensors, s.layers)
        throttle = TokenBucket(options.read_bytes_per_s, READ_BURST) if options.read_bytes_per_s else None
        self.file = WeightsFile(fused.sidecar_dir / fg.WEIGHTS_NAME, meta["weights_bytes"], throttle, options.direct_io)
        self.embedding = fused.embedding
        # rotary rows are computed per step for the step's positions only (no table held)
        self.inv_freq, self.rope_scaling = fg.rope_from_graph(Path(root) / manifest["graphs"]["fp32"]["file"])
        self.io = dataclasses.replace(io, kv_dtype="float32")
        self.threads, self.accuracy_level, self.provider = threads, accuracy_level, providers[0]
        self.providers = providers
        # `threads` is the CPU to share: builder threads prepack paged layers while the computing thread
        # runs the others on what the builders leave (one thread at least) rather than contend with them
        self.builders = max(1, min(max(sh[1] for sh in MEASURED_SHAPES) - 1, threads))
        self.compute_threads = max(1, threads - self.builders)

        self.roles = layer_roles(self.tensors, 0)
        # copied out of the slot: all but the int4 matrices (scales too: at accuracy level 1 MatMulNBits
        # reads them at run time instead of prepacking them)
        self.small_roles = {r for r in self.roles if not r.endswith(".B")}
        qkv_bias = "qkv.bias" in self.roles
        self.layer_graph = fg.build_layer_graph(s, self.roles, accuracy_level, qkv_bias=qkv_bias).SerializeToString()

        self.heap: dict = {}
        self.probe: BuildProbe | None = None
        self.plan = plan_for(self.tensors, s.layers, options.budget_bytes)
        if self.plan.paged:
            # a dropped session's prepacked buffers stay faulted in for the next build (paging/heap.py)
            self.heap = heap.keep_freed_buffers(self.plan.slot_bytes, (max(sh[1] for sh in MEASURED_SHAPES) + 1) * self.plan.slot_bytes)
            # paged layers read, one built and run: the measured times choose the pipeline's shape
            self.probe = self._probe(self.plan.paged[-1], Ledger(options.budget_bytes).aligned("probe", self.plan.slot_bytes))
            self.plan = plan_for(self.tensors, s.layers, options.budget_bytes, self.probe)
        tail_tensors = {n: t for n, t in self.tensors.items() if not n.startswith(("model.layers.", "rope."))}
        tail_graph = fg.build_tail_graph(s, tail_tensors, accuracy_level).SerializeToString()

        self.ledger = Ledger(options.budget_bytes)
        self.ledger.charge("lm_head+norm", self.plan.fixed_bytes)
        from ..backends import hugepages

        before = hugepages.anonymous_regions() if huge_pages else None
        mm = np.memmap(self.file.path, np.uint8, mode="r")
        try:
            # as for layers, all but the int4 matrices are copied: no view may keep the file mapped (an fp16
            # lm_head excepted: onnxruntime folds its Cast into an fp32 copy of its own; the view stays)
            self.tail = self._session(tail_graph, {n: self._view(mm, t) if n.endswith(".B") or n == "lm_head.fp16"
                                                   else np.array(self._view(mm, t)) for n, t in tail_tensors.items()},
                                      "the tail", optimize=True)
            # resident layers are read one by one into a staging slot (O_DIRECT, no page cache) where the
            # sessions own their prepacked matrices; else built from the map, which they then keep
            staging = self.ledger.aligned("staging", self.plan.slot_bytes) if self.probe and self.probe.release_early else None
            if staging is not None:
                del mm
            self.resident: dict[int, object] = {}
            for i in self.plan.resident:
                # onnxruntime holds these weights prepacked for MatMulNBits; counted at their size
                self.ledger.charge(f"layer{i}", page_round(self.spans[i][1]))
                if staging is None:
                    self.resident[i] = self._layer_session(i, mm, 0)
                else:
                    self.file.read_into(staging, *self.spans[i])
                    self.resident[i] = self._layer_session(i, staging, self.spans[i][0])
            if staging is not None:
                del staging
                self.ledger.release("staging")
        finally:
            mm = None
        # the resident sessions' prepacked weights on 2 MiB pages (runtime/backends/hugepages.py)
        self.huge_pages = hugepages.advise_new(before, background=True) if huge_pages else hugepages.Advice(reason="disabled")
        if hasattr(os, "posix_fadvise"):  # the sessions hold their own copies now
            os.posix_fadvise(self.file.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.reader = None
        if self.plan.paged:
            slots = [self.ledger.aligned(f"slot{k}", self.plan.slot_bytes) for k in range(self.plan.slots)]
            for k in range(self.plan.sessions):  # the sessions' prepacked copies
                self.ledger.charge(f"session{k}", self.plan.slot_bytes)
            self.release_early = self.probe.release_early
            me = weakref.ref(self)  # the pipeline must not keep this backend alive

            def build(layer: int, buf: np.ndarray, base: int):
                backend = me()
                if backend is None:
                    raise RuntimeBackendError("the paged backend was closed")
                return backend._layer_session(layer, buf, base)

            sessions = self.plan.sessions if self.release_early else min(self.plan.sessions, self.plan.slots)
            self.reader = SessionPipeline(self.file, self.spans, self.plan.paged, slots, build, max_sessions=sessions,
                                          builders=min(self.builders, max(1, sessions - 1)), release_early=self.release_early)
            # the pipeline's threads may be inside onnxruntime: stop them before the interpreter exits
            weakref.finalize(self, self.reader.close)
        log.info("paging (fused graph): %d of %d layers resident, %d streamed from %s (%s), %s bytes paged per token, "
                 "budget %s bytes", len(self.plan.resident), s.layers, len(self.plan.paged), self.file.path.name,
                 self.file.mode, f"{self.plan.bytes_paged_per_token:,}", f"{options.budget_bytes:,}")

    # --- sessions ---------------------------------------------------------------------------------------------

    @staticmethod
    def _view(buf: np.ndarray, t: dict, base: int = 0) -> np.ndarray:
        start = t["offset"] - base
        return buf[start:start + t["nbytes"]].view(NP[t["dtype"]]).reshape(t["shape"])

    def _session(self, graph: bytes, weights: dict[str, np.ndarray], what: str, optimize: bool = False):
        ort = self.ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.compute_threads, 1
        # the layer graph is written as onnxruntime's optimizers would leave it (the same nodes at every
        # level, checked in tests): skipping them shortens every paged layer's build. The tail, built once,
        # is optimized (an fp16 lm_head's Cast is folded there)
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        # one thread pool per session: idle pools must not spin on the cores the running one needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # the weights are handed over without a copy (onnxruntime copies add_external_initializers' tensors
        # before prepacking them); the graphs name the sidecar file as their place (fused/graph.py, _Builder)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.file.path.parent))
        values = []
        for name, w in weights.items():
            values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w)))
            so.add_initializer(name, values[-1])
        try:
            sess = ort.InferenceSession(graph, so, providers=self.providers)
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime could not build the session of {what}: {exc}") from exc
        # tensors onnxruntime did not prepack are read from these at run time; the int4 matrices are let go
        # once the probe showed the session owns their prepacked copies (else a session built from the
        # memory-mapped sidecar would keep the file's pages mapped, and counted, for its lifetime)
        owned = self.probe is not None and self.probe.release_early
        sess._edge_sdk_keep = [v for n, v in zip(weights, values) if not (owned and n.endswith(".B"))]
        return sess

    def _layer_session(self, i: int, buf: np.ndarray, base: int):
        """Layer i's session from `buf` (the memory-mapped sidecar, or the slot the reader filled at the
        layer's start). Scales, norms and biases are copied: only the prepacked matrices may leave the slot."""
        roles = layer_roles(self.tensors, i)
        weights = {}
        for role, t in roles.items():
            v = self._view(buf, t, base)
            weights[f"layer.{role}"] = np.array(v) if role in self.small_roles else v
        return self._session(self.layer_graph, weights, f"decoder layer {i}")

    def _probe(self, i: int, slot: np.ndarray) -> BuildProbe:
        """Paged layers read (the last, i, into `slot`), layer i built from the slot (twice: the first build
        also warms the allocator) and run: the times the plan is chosen by, and whether sessions own their
        weights."""
        off, nbytes = self.spans[i]
        reads = []
        for j in (*self.plan.paged[:2], i):  # single reads vary by tens of percent: the median of three
            t0 = time.perf_counter()
            self.file.read_into(slot, self.spans[j][0], self.spans[j][1])
            reads.append(self.spans[j][1] / max(time.perf_counter() - t0, 1e-6))
        builds = []
        for _ in range(2):
            t0 = time.perf_counter()
            sess = self._layer_session(i, slot, off)
            builds.append(time.perf_counter() - t0)
        owns, compute_s = self._prepack_owns_weights(sess, slot, nbytes)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return BuildProbe(read_bytes_per_s=sorted(reads)[1], build_s=builds[-1], layer_compute_s=compute_s,
                          cores=min(cores, self.threads), threads=self.compute_threads, release_early=owns)

    def _prepack_owns_weights(self, sess, slot: np.ndarray, nbytes: int) -> tuple[bool, float]:
        """Whether a layer session keeps working after the slot it was built from is overwritten (its
        int4 matrices prepacked into onnxruntime's own memory): then slots are reused right after a
        build. Checked once per load on a paged layer; also returns the fastest of a few runs of the
        layer at batch 1 (seconds)."""
        s, rng = self.shape, np.random.default_rng(0)
        cos, sin = fg.rope_rows(np.array([0]), self.inv_freq, self.rope_scaling)
        empty = np.zeros((1, s.kv_heads, 0, s.head_dim), np.float32)
        feeds = {"residual": rng.standard_normal((1, 1, s.hidden)).astype(np.float32),
                 "pending": np.zeros((1, 1, s.hidden), np.float32), "attention_mask": np.ones((1, 1), np.int64),
                 "position_ids": np.zeros((1, 1), np.int64), "rope.cos": cos, "rope.sin": sin,
                 "past_key": empty, "past_value": empty}
        before = sess.run(["pending_out"], feeds)[0]
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            sess.run(["pending_out"], feeds)
            runs.append(time.perf_counter() - t0)
        slot[:nbytes] = np.uint8(0x5A)
        after = sess.run(["pending_out"], feeds)[0]
        return bool(np.array_equal(before, after)), min(runs)

    # --- Backend interface -------------------------------------------------------------------------------------

    kv_copies = 1  # GroupQueryAttention appends in place (kv_cache.SharedKVCache)
    can_rollback = True  # speculative decoding: a rollback sets the shared buffer's length, no copy

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return SharedKVCache(self.io, batch, capacity)

    def forward(self, input_ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None = None) -> np.ndarray:
        ids, mask = check_step(input_ids, cache, new_mask)
        return one_token_at_a_time_over_a_past(self._step, ids, cache, mask)

    def _step(self, ids: np.ndarray, cache: KVCache, mask: np.ndarray) -> np.ndarray:
        attn, pos = cache.step_inputs(mask)
        uniq, where = np.unique(pos, return_inverse=True)
        rope = fg.rope_rows(uniq, self.inv_freq, self.rope_scaling)
        pos = where.reshape(pos.shape).astype(np.int64)  # indices into this step's rows
        residual = np.ascontiguousarray(self.embedding(ids))
        pending = np.zeros_like(residual)
        new = ids.shape[1]
        for i in range(self.shape.layers):
            sess, token = self.resident.get(i), None
            if sess is None:
                token, sess = self.reader.get(i)
            try:
                residual, pending = self._run_layer(sess, i, residual, pending, attn, pos, rope, cache, new)
            finally:
                if token is not None:
                    del sess  # frees the prepacked weights before another session is built
                    self.reader.done(token)
        try:
            logits = self.tail.run(["logits"], {"residual": residual, "pending": pending})[0]
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime failed running the tail: {exc}") from exc
        cache.advance(mask)
        return logits

    def _run_layer(self, sess, i, residual, pending, attn, pos, rope, cache, new):
        try:
            b = sess.io_binding()
            b.bind_output("residual_out", "cpu")  # first: get_outputs() follows binding order
            b.bind_output("pending_out", "cpu")
            for name, value in (("residual", residual), ("pending", pending), ("attention_mask", attn), ("position_ids", pos),
                                ("rope.cos", rope[0]), ("rope.sin", rope[1])):
                b.bind_cpu_input(name, value)
            dt = np.float32
            for kind, k in (("key", 0), ("value", 1)):
                ptr, shape = cache.binding(i, k)
                b.bind_input(f"past_{kind}", "cpu", 0, dt, list(shape), ptr)
                ptr, shape = cache.binding(i, k, new)
                b.bind_output(f"present_{kind}", "cpu", 0, dt, list(shape), ptr)
            sess.run_with_iobinding(b)
            out = b.get_outputs()
            return out[0].numpy(), out[1].numpy()
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime failed running decoder layer {i}: {exc}") from exc

    def describe(self) -> dict:
        return {"backend": "onnxruntime-paged", "graph": f"single-layer graph over {self.file.path.name}",
                "graph_form": "fused", "provider": self.provider, "threads": self.compute_threads,
                "builder_threads": self.reader.builders if self.reader else 0,
                "accuracy_level": self.accuracy_level, "kv_dtype": self.io.kv_dtype, "io": self.file.mode,
                "read_bytes_per_s": self.options.read_bytes_per_s, "paging": self.plan.to_dict(),
                "slots_reused_after_build": bool(self.reader and self.reader.release_early), "malloc": self.heap,
                "probe": self.probe.to_dict() if self.probe else None,
                "huge_pages": self.huge_pages.to_dict()}

    close = PagedBackend.close
    __del__ = PagedBackend.__del__
