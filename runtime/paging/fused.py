"""Layer-streamed executor over the fused graph (runtime/fused_graph.py), for onnxruntime's CPU provider.

The paged layers are read from the fused sidecar file, already in MatMulNBits' layout, by the reader
thread, which then builds the layer's session from the slot it filled (onnxruntime prepacks the int4
weights while the computing thread runs other layers). The computing thread runs that session and
drops it; the slot goes back to the reader. Resident layers and the tail (final norm, lm_head) are
sessions built once at load from the same file. Every session is the same single-layer graph; only
the weights it is given differ, so paged and resident layers compute exactly alike.

Why sessions per paged layer: a layer whose int4 weights are graph inputs cannot use onnxruntime's
prepacked MatMulNBits kernel (it dequantizes the whole matrix every call, ~30x slower). Building a
session prepacks once per use: ~20 ms for a 1.5B layer, overlapped with the compute of others.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import weakref
from pathlib import Path

import numpy as np

from edge_sdk.errors import BundleError, MemoryBudgetError, RuntimeBackendError, require

from .. import fused_graph as fg
from ..backend import check_step
from ..kv_cache import KVCache, ModelIO
from .backend import PagingOptions
from .buffers import Ledger, TokenBucket
from .plan import PagingPlan, page_round, plan_paging
from .reader import LayerReader, WeightsFile

log = logging.getLogger("edge_sdk.runtime")

# prepacked weights live in onnxruntime next to the slot they were read into until the session is
# dropped: a slot costs two layers
SLOT_COPIES = 2
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


def plan_for(tensors: dict, layers: int, budget: int, slots: int) -> PagingPlan:
    """Two prefetch slots where the budget allows, else one (the reader then reads while resident
    layers compute only)."""
    sizes = [n for _, n in layer_spans(tensors, layers)]
    try:
        return plan_paging(sizes, sidecar_fixed_bytes(tensors), budget, slots, slot_copies=SLOT_COPIES)
    except MemoryBudgetError:
        if slots <= 1:
            raise
        return plan_paging(sizes, sidecar_fixed_bytes(tensors), budget, 1, slot_copies=SLOT_COPIES)


class FusedPagedBackend:
    def __init__(self, root: Path, manifest: dict, io: ModelIO, options: PagingOptions, *, sidecar_dir: Path,
                 providers: list, threads: int, accuracy_level: int):
        ort = require("onnxruntime", "runtime")
        self.ort, self.root, self.options = ort, Path(root), options
        self.shape = s = fg.Shape.from_manifest(manifest)
        meta = json.loads((Path(sidecar_dir) / fg.METADATA).read_text())
        self.tensors = meta["tensors"]
        self.spans = layer_spans(self.tensors, s.layers)
        self.plan = plan_for(self.tensors, s.layers, options.budget_bytes, options.slots)
        throttle = TokenBucket(options.read_bytes_per_s) if options.read_bytes_per_s else None
        self.file = WeightsFile(Path(sidecar_dir) / fg.WEIGHTS_NAME, meta["weights_bytes"], throttle, options.direct_io)
        self.embedding = fg.EmbeddingRows(root, manifest)
        # rotary rows are computed per step for the step's positions only (no table held)
        self.inv_freq, self.rope_scaling = fg.rope_from_graph(Path(root) / manifest["graphs"]["fp32"]["file"])
        self.io = dataclasses.replace(io, kv_dtype="float32")
        self.threads, self.accuracy_level, self.provider = threads, accuracy_level, providers[0]
        self.providers = providers

        self.roles = layer_roles(self.tensors, 0)
        self.small_roles = {r for r, t in self.roles.items() if not r.endswith((".B", ".scales"))}
        qkv_bias = "qkv.bias" in self.roles
        self.layer_graph = fg.build_layer_graph(s, self.roles, accuracy_level, qkv_bias=qkv_bias).SerializeToString()
        tail_tensors = {n: t for n, t in self.tensors.items() if not n.startswith(("model.layers.", "rope."))}
        tail_graph = fg.build_tail_graph(s, tail_tensors, accuracy_level).SerializeToString()

        self.ledger = Ledger(options.budget_bytes)
        self.ledger.charge("lm_head+norm+rope", self.plan.fixed_bytes)
        mm = np.memmap(self.file.path, np.uint8, mode="r")
        try:
            self.tail = self._session(tail_graph, {n: self._view(mm, t) for n, t in tail_tensors.items()}, "the tail")
            self.resident: dict[int, object] = {}
            for i in self.plan.resident:
                # onnxruntime holds these weights prepacked for MatMulNBits; counted at their size
                self.ledger.charge(f"layer{i}", page_round(self.spans[i][1]))
                self.resident[i] = self._layer_session(i, mm, 0)
        finally:
            del mm
        if hasattr(os, "posix_fadvise"):  # the sessions hold their own copies now
            os.posix_fadvise(self.file.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.reader = None
        if self.plan.paged:
            slots = []
            for k in range(self.plan.slots):
                slots.append(self.ledger.aligned(f"slot{k}", self.plan.slot_bytes))
                self.ledger.charge(f"slot{k}.prepacked", self.plan.slot_bytes)  # the session built from it
            me = weakref.ref(self)  # the reader must not keep this backend alive

            def prepare(layer: int, buf: np.ndarray):
                backend = me()
                if backend is None:
                    raise RuntimeBackendError("the paged backend was closed")
                return backend._layer_session(layer, buf, backend.spans[layer][0])

            self.reader = LayerReader(self.file, dict(enumerate(self.spans)), self.plan.paged, slots, prepare=prepare)
            # the reader thread may be inside onnxruntime: stop it before the interpreter exits
            weakref.finalize(self, self.reader.close)
        log.info("paging (fused graph): %d of %d layers resident, %d streamed from %s (%s), %s bytes paged per token, "
                 "budget %s bytes", len(self.plan.resident), s.layers, len(self.plan.paged), self.file.path.name,
                 self.file.mode, f"{self.plan.bytes_paged_per_token:,}", f"{options.budget_bytes:,}")

    # --- sessions ---------------------------------------------------------------------------------------------

    @staticmethod
    def _view(buf: np.ndarray, t: dict, base: int = 0) -> np.ndarray:
        start = t["offset"] - base
        return buf[start:start + t["nbytes"]].view(NP[t["dtype"]]).reshape(t["shape"])

    def _session(self, graph: bytes, weights: dict[str, np.ndarray], what: str):
        ort = self.ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        so.log_severity_level = 3
        # one thread pool per session: idle pools must not spin on the cores the running one needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        names = list(weights)
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(weights[n])) for n in names]
        so.add_external_initializers(names, values)
        try:
            sess = ort.InferenceSession(graph, so, providers=self.providers)
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime could not build the session of {what}: {exc}") from exc
        sess._edge_sdk_keep = values  # tensors onnxruntime did not prepack are read from these at run time
        return sess

    def _layer_session(self, i: int, buf: np.ndarray, base: int):
        """Layer i's session from `buf` (the memory-mapped sidecar, or the slot the reader filled at the
        layer's start). Norms and biases are copied: only the prepacked matrices may leave the slot."""
        roles = layer_roles(self.tensors, i)
        weights = {}
        for role, t in roles.items():
            v = self._view(buf, t, base)
            weights[f"layer.{role}"] = np.array(v) if role in self.small_roles else v
        return self._session(self.layer_graph, weights, f"decoder layer {i}")

    # --- Backend interface -------------------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.io, batch, capacity)

    def forward(self, input_ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None = None) -> np.ndarray:
        ids, mask = check_step(input_ids, cache, new_mask)
        if ids.shape[0] > 1 and ids.shape[1] > 1 and cache.length:  # see OrtBackend.forward
            return np.concatenate([self._step(ids[:, t:t + 1], cache, mask[:, t:t + 1]) for t in range(ids.shape[1])], axis=1)
        return self._step(ids, cache, mask)

    def _step(self, ids: np.ndarray, cache: KVCache, mask: np.ndarray) -> np.ndarray:
        attn, pos = cache.step_inputs(mask)
        uniq, where = np.unique(pos, return_inverse=True)
        rope = fg.rope_rows(uniq, self.inv_freq, self.rope_scaling)
        pos = where.reshape(pos.shape).astype(np.int64)  # indices into this step's rows
        residual = np.ascontiguousarray(self.embedding(ids))
        pending = np.zeros_like(residual)
        new = ids.shape[1]
        for i in range(self.shape.layers):
            sess, slot = self.resident.get(i), None
            if sess is None:
                slot, _ = self.reader.get(i)
                sess = self.reader.prepared(slot)
            try:
                residual, pending = self._run_layer(sess, i, residual, pending, attn, pos, rope, cache, new)
            finally:
                if slot is not None:
                    del sess  # frees the prepacked weights before the slot is refilled
                    self.reader.release(slot)
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
        return {"backend": "onnxruntime-paged", "graph_form": "fused", "provider": self.provider, "threads": self.threads,
                "accuracy_level": self.accuracy_level, "kv_dtype": self.io.kv_dtype, "io": self.file.mode,
                "read_bytes_per_s": self.options.read_bytes_per_s, "paging": self.plan.to_dict()}

    def close(self) -> None:
        if self.reader:
            self.reader.close()
            self.reader = None
        if self.file.fd is not None:
            self.file.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
