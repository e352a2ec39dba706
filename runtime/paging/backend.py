"""Layer-streamed backend: the `Backend` interface over a model whose weights exceed the memory budget.

Per forward pass: head graph (rotary tables, mask) -> embedding rows read from the weights file ->
each decoder layer through one single-layer session, its weights bound by address from a resident
buffer or from the slot the reader filled -> tail graph (final norm, lm_head; resident).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from edge_sdk.errors import BundleError, ConfigError, RuntimeBackendError, require

from ..backends.base import check_step
from ..backends.fused.graph import EMBED
from ..backends.fused.weights import EmbeddingRows
from ..backends.kv_cache import KVCache, ModelIO
from ..token_bucket import TokenBucket
from .buffers import Ledger
from edge_sdk.paging_model import PagingPlan, page_round, plan_paging
from .reader import READ_BURST, LayerReader, WeightsFile
from .surgery import HIDDEN_IN, HIDDEN_OUT, PAST, PRESENT, load_or_split

log = logging.getLogger("edge_sdk.runtime")

# manifest dtype -> onnx TensorProto element type (int4 has no numpy type; bound by enum)
ONNX_TYPES = {"int4": 22, "uint4": 21, "float16": 10, "float32": 1, "bfloat16": 16, "int8": 3, "uint8": 2}
EXTERNAL_DIR_KEY = "session.model_external_initializers_file_folder_path"


@dataclasses.dataclass(frozen=True)
class PagingOptions:
    budget_bytes: int  # weights memory the executor may hold (fixed + resident layers + prefetch slots)
    read_bytes_per_s: float | None = None  # storage throttle (emulated boards); None = what the disk gives
    slots: int = 2
    direct_io: bool = True
    cache_root: str | None = None  # split graphs; default <bundle parent>/.edge-sdk-paging
    fuse_resident: bool = True  # resident layers: own session, weights as initializers (MatMulNBits)
    io: str = "reader"  # "reader": prefetch thread + aligned slots; "mmap": the naive baseline (naive_mmap.py)

    def __post_init__(self):
        if self.io not in ("reader", "mmap"):
            raise ConfigError(f"paging io {self.io!r} is not 'reader' or 'mmap'")


def layer_table(manifest: dict) -> list[tuple[int, int]]:
    """[(offset, nbytes)] of every decoder layer, by index."""
    layers = sorted(manifest["weights"]["layers"], key=lambda e: e["index"])
    return [(int(e["offset"]), int(e["nbytes"])) for e in layers]


def fixed_bytes(manifest: dict) -> int:
    """Resident bytes outside the layers: every non-layer tensor except the embedding table."""
    return sum(int(t["nbytes"]) for n, t in manifest["weights"]["tensors"].items()
               if not n.startswith("model.layers.") and n != EMBED)


class PagedBackend:
    def __init__(self, root: Path, manifest: dict, graph_path: Path, io: ModelIO, options: PagingOptions, *,
                 providers: list, threads: int, accuracy_level: int = 4):
        ort = require("onnxruntime", "runtime")
        from ..backends.engine_cache import bundle_hash
        from .surgery import cache_dir

        self.root, self.options = Path(root), options
        weights = manifest.get("weights") or {}
        if not weights.get("layers") or not weights.get("tensors"):
            raise BundleError(f"{root}: the manifest has no weights.layers/tensors table", hint="re-convert the model to page it")
        self.tensors = weights["tensors"]
        self.layers = layer_table(manifest)
        self.plan: PagingPlan = plan_paging([n for _, n in self.layers], fixed_bytes(manifest), options.budget_bytes, options.slots)
        self.graphs = load_or_split(graph_path, self.tensors, cache_dir(root, bundle_hash(root), options.cache_root))
        needed = max(int(t["offset"]) + int(t["nbytes"]) for t in self.tensors.values())
        throttle = TokenBucket(options.read_bytes_per_s, READ_BURST) if options.read_bytes_per_s else None
        self.file = WeightsFile(self.root / weights.get("file", "model.weights"), needed, throttle, options.direct_io)

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        so.add_session_config_entry(EXTERNAL_DIR_KEY, str(self.root.absolute()))
        so.log_severity_level = 3
        # one thread pool per session (head, layer, tail, each resident layer): idle pools must not
        # spin on the cores the running session needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.sessions_bytes = {n: self.graphs.path(n).read_bytes() for n in ("head", "layer", "tail")}
            self.sessions = {n: ort.InferenceSession(b, so, providers=providers) for n, b in self.sessions_bytes.items()}
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime could not load the paging graphs in {self.graphs.directory}: {exc}",
                                      hint="delete that directory to split the bundle graph again") from exc
        self.provider = self.sessions["layer"].get_providers()[0]
        self.threads, self.accuracy_level = threads, accuracy_level
        kv = next(i for i in self.sessions["layer"].get_inputs() if i.name == PAST["key"])
        self.io = dataclasses.replace(io, kv_dtype="float16" if kv.type == "tensor(float16)" else "float32")
        hid = next(i for i in self.sessions["layer"].get_inputs() if i.name == HIDDEN_IN)
        self.hidden_dtype = np.float16 if hid.type == "tensor(float16)" else np.float32
        self.embedding = EmbeddingRows(self.root, manifest)  # rows read per step, never the table

        self.ledger = Ledger(options.budget_bytes)
        self.ledger.charge("lm_head+norms", self.plan.fixed_bytes)
        self.resident: dict[int, np.ndarray] = {}
        self.fused: dict = {}
        self._bindings = [self._weight_bindings(i) for i in range(len(self.layers))]
        for i in self.plan.resident:
            if options.fuse_resident:
                # onnxruntime holds these weights (prepacked for MatMulNBits); counted at their size
                self.ledger.charge(f"layer{i}", page_round(self.layers[i][1]))
                self.fused[i] = self._fused_session(ort, so, providers, i, weights.get("file", "model.weights"))
            else:
                buf = self.ledger.aligned(f"layer{i}", self.layers[i][1])
                self.file.read_into(buf, *self.layers[i])
                self.resident[i] = buf
        if options.io == "mmap" and self.plan.paged:
            from .naive_mmap import MmapPages

            self.reader = MmapPages(self.file.path, dict(enumerate(self.layers)))
        else:
            slots = [self.ledger.aligned(f"slot{k}", self.plan.slot_bytes) for k in range(self.plan.slots)]
            self.reader = LayerReader(self.file, dict(enumerate(self.layers)), self.plan.paged, slots) if self.plan.paged else None
        log.info("paging: %d of %d layers resident, %d streamed from %s (%s), %s bytes paged per token, budget %s bytes",
                 len(self.plan.resident), len(self.layers), len(self.plan.paged), self.file.path.name, self.file.mode,
                 f"{self.plan.bytes_paged_per_token:,}", f"{options.budget_bytes:,}")

    def _fused_session(self, ort, so, providers, i: int, weights_file: str):
        """Layer i with its weights as initializers in the bundle's weights file, so onnxruntime fuses
        DequantizeLinear + MatMul into MatMulNBits as in the resident backend."""
        onnx = require("onnx", "runtime")
        m = onnx.load_from_string(self.sessions_bytes["layer"])
        g = m.graph
        roles = set(self.graphs.roles)
        keep = [x for x in g.input if x.name not in roles]
        del g.input[:]
        g.input.extend(keep)
        base = self.layers[i][0]
        for name, off, etype, shape in self._bindings[i]:
            t = onnx.TensorProto(name=name, data_type=etype, dims=shape, data_location=onnx.TensorProto.EXTERNAL)
            nbytes = self.tensors[f"model.layers.{i}.{name}"]["nbytes"]
            for k, v in (("location", weights_file), ("offset", str(base + off)), ("length", str(nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            g.initializer.append(t)
        try:
            return ort.InferenceSession(m.SerializeToString(), so, providers=providers)
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime could not load resident layer {i}: {exc}") from exc

    def _weight_bindings(self, i: int) -> list[tuple[str, int, int, list[int]]]:
        """(input name, byte offset inside the layer, onnx element type, shape) of layer i's weights."""
        base, out = self.layers[i][0], []
        for role in self.graphs.roles:
            t = self.tensors.get(f"model.layers.{i}.{role}")
            if t is None:
                raise BundleError(f"{self.root}: layer {i} has no tensor {role}", hint="re-convert the model")
            out.append((role, int(t["offset"]) - base, ONNX_TYPES[t["dtype"]], [int(d) for d in t["shape"]]))
        return out

    # the cache is host memory whatever the provider (CUDA included; the layer binds it as "cpu"), so
    # speculative decoding rolls it back: to the start of the last step by swapping buffers, inside it
    # by copying the kept tokens (what the graph's Concat does every step anyway)
    can_rollback = True

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.io, batch, capacity)

    def forward(self, input_ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None = None) -> np.ndarray:
        ids, mask = check_step(input_ids, cache, new_mask)
        attn, pos = cache.step_inputs(mask)
        feeds = {"input_ids": ids, "attention_mask": attn, "position_ids": pos}
        shared = self.sessions["head"].run(self.graphs.shared, {k: feeds[k] for k in self.graphs.head_inputs})
        shared = [np.ascontiguousarray(s) for s in shared]
        hidden = np.ascontiguousarray(self.embedding(ids, self.hidden_dtype))
        layer = self.sessions["layer"]
        dt = np.dtype(self.io.kv_dtype)
        new = ids.shape[1]
        for i in range(len(self.layers)):
            slot, addr, sess = None, None, self.fused.get(i, layer)
            if i in self.resident:
                addr = self.resident[i].ctypes.data
            elif i not in self.fused:
                slot, buf = self.reader.get(i)
                addr = buf.ctypes.data
            try:
                hidden = self._run_layer(sess, i, hidden, shared, feeds, cache, addr, dt, new)
            finally:
                if slot is not None:
                    self.reader.release(slot)
        logits = self.sessions["tail"].run(["logits"], {HIDDEN_IN: hidden})[0]
        cache.advance(mask)
        return np.asarray(logits, dtype=np.float32)

    def _run_layer(self, sess, i, hidden, shared, feeds, cache, addr, dt, new) -> np.ndarray:
        try:
            b = sess.io_binding()
            b.bind_cpu_input(HIDDEN_IN, hidden)
            b.bind_output(HIDDEN_OUT, "cpu")  # first: get_outputs() follows binding order
            for name, value in zip(self.graphs.shared, shared):
                b.bind_cpu_input(name, value)
            for name in self.graphs.layer_inputs:
                b.bind_cpu_input(name, feeds[name])
            for kind, k in (("key", 0), ("value", 1)):
                ptr, shape = cache.binding(i, k)
                b.bind_input(PAST[kind], cache.device, 0, dt, list(shape), ptr)
                ptr, shape = cache.binding(i, k, new)
                b.bind_output(PRESENT[kind], cache.device, 0, dt, list(shape), ptr)
            if addr is not None:  # weights bound by address: a resident buffer or the slot just read
                for name, off, etype, shape in self._bindings[i]:
                    b.bind_input(name, "cpu", 0, etype, shape, addr + off)
            sess.run_with_iobinding(b)
            return b.get_outputs()[0].numpy()
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime failed running decoder layer {i}: {exc}") from exc

    def describe(self) -> dict:
        return {"backend": "onnxruntime-paged", "provider": self.provider, "threads": self.threads,
                "accuracy_level": self.accuracy_level, "kv_dtype": self.io.kv_dtype, "io": "mmap" if self.options.io == "mmap" else self.file.mode,
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
