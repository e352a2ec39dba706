"""onnxruntime backend: one session over the bundle's graph, IO binding onto the KV cache buffers."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from edge_sdk.errors import ConfigError, RuntimeBackendError, require

from . import providers as prov
from .base import check_step, one_token_at_a_time_over_a_past
from .kv_cache import KVCache, ModelIO, SharedKVCache

log = logging.getLogger("edge_sdk.runtime")

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
# onnxruntime session config key for the DequantizeLinear+MatMul -> MatMulNBits fusion
QDQ_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


class OrtBackend:
    def __init__(self, graph_path: str | Path, io: ModelIO, *, providers: list, threads: int,
                 accuracy_level: int = 4, optimized_model_path: str | Path | None = None,
                 fused=None, huge_pages: bool = True):
        """fused: the fused.FusedGraph (runtime/backends/fused/) when `graph_path` is that graph (CPU provider)."""
        ort = require("onnxruntime", "runtime")
        self.graph_path = Path(graph_path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry(QDQ_ACCURACY_KEY, str(accuracy_level))
        so.log_severity_level = 3
        if optimized_model_path:
            so.optimized_model_filepath = str(optimized_model_path)
        from . import hugepages

        before = hugepages.anonymous_regions() if huge_pages else None
        try:
            self.session = ort.InferenceSession(str(self.graph_path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RuntimeBackendError(f"onnxruntime could not load {self.graph_path.name}: {exc}",
                                      hint="check the bundle with `edge-sdk verify`, or try provider='cpu'") from exc
        self.threads, self.accuracy_level = threads, accuracy_level
        # the prepacked weights on 2 MiB pages: a decode step streams all of them (runtime/backends/hugepages.py)
        self.huge_pages = hugepages.advise_new(before, background=True) if huge_pages else hugepages.Advice(reason="disabled")
        self.fused = fused
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider in (prov.TRT_EP, prov.CUDA_EP) else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._input_names = set(inputs)
        past0 = io.past_name.format(i=0, kind="key")
        ids_name = "input_ids" if fused is None else "inputs_embeds"
        if past0 not in inputs or ids_name not in inputs:
            raise RuntimeBackendError(f"{self.graph_path.name} lacks inputs {ids_name}/{past0} (has {', '.join(sorted(inputs))})",
                                      hint="the graph does not follow the bundle I/O contract: re-convert the model")
        kv_dtype = ORT_TYPES.get(inputs[past0].type)
        if kv_dtype is None:
            raise RuntimeBackendError(f"{past0} has unsupported type {inputs[past0].type}")
        self.io = dataclasses.replace(io, kv_dtype=kv_dtype)
        self._names = [(self.io.past_name.format(i=i, kind=k), self.io.present_name.format(i=i, kind=k))
                       for i in range(self.io.num_layers) for k in ("key", "value")]

    @property
    def mapped_bytes(self) -> int | None:
        """Bytes the fused graph loads; None for the bundle's own graph, whose files the manifest lists."""
        return self.fused.loaded_bytes() if self.fused else None

    @property
    def weight_bytes_per_token(self) -> int | None:
        """Weight bytes a decode step of the fused graph reads; None for the bundle's graph (the manifest says)."""
        return self.fused.read_bytes_per_token() if self.fused else None

    @property
    def kv_copies(self) -> int:
        """Layer-sized KV buffers per layer and kind that a cache of this backend allocates."""
        return 1 if self.fused else 2

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        if self.fused:
            if capacity > self.fused.positions:
                raise ConfigError(f"a KV cache of {capacity} tokens exceeds the {self.fused.positions} positions the fused graph "
                                  "was built for", hint="load with a smaller max_seq_len, or graph='standard'")
            return SharedKVCache(self.io, batch, capacity)  # GroupQueryAttention appends in place
        if self.device == "cpu":
            return KVCache(self.io, batch, capacity)
        return OrtValueKVCache(self.io, batch, capacity, device=self.device)

    def forward(self, input_ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None = None) -> np.ndarray:
        ids, mask = check_step(input_ids, cache, new_mask)
        if self.fused:
            return one_token_at_a_time_over_a_past(self._run, ids, cache, mask)
        return self._run(ids, cache, mask)

    def _run(self, ids: np.ndarray, cache: KVCache, mask: np.ndarray) -> np.ndarray:
        attn, pos = cache.step_inputs(mask)
        b = self.session.io_binding()
        if self.fused:
            b.bind_cpu_input("inputs_embeds", self.fused.embedding(ids))
        else:
            b.bind_cpu_input("input_ids", ids)
        if "attention_mask" in self._input_names:
            b.bind_cpu_input("attention_mask", attn)
        if "position_ids" in self._input_names:
            b.bind_cpu_input("position_ids", pos)
        b.bind_output("logits", "cpu")  # bound first: get_outputs() follows binding order
        dt = np.dtype(self.io.kv_dtype)
        new = ids.shape[1]
        for n, (past_name, present_name) in enumerate(self._names):
            layer, kind = divmod(n, 2)
            # bound by address: views of the preallocated buffers, no copy, no allocation
            ptr, shape = cache.binding(layer, kind)
            b.bind_input(past_name, cache.device, 0, dt, list(shape), ptr)
            ptr, shape = cache.binding(layer, kind, new)
            b.bind_output(present_name, cache.device, 0, dt, list(shape), ptr)
        try:
            self.session.run_with_iobinding(b)
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime failed running {self.graph_path.name}: {exc}") from exc
        logits = b.get_outputs()[0].numpy()
        cache.advance(mask)
        return logits

    def describe(self) -> dict:
        return {"backend": "onnxruntime", "provider": self.provider, "providers": self.session.get_providers(),
                "graph": self.graph_path.name, "graph_form": "fused" if self.fused else "standard", "threads": self.threads,
                "accuracy_level": self.accuracy_level, "kv_dtype": self.io.kv_dtype, "huge_pages": self.huge_pages.to_dict()}


@dataclasses.dataclass
class OrtValueKVCache(KVCache):
    """KV buffers as onnxruntime OrtValues on `device` ("cuda" for the CUDA / TensorRT EPs), so the
    cache stays in device memory between steps; bound by address like the host buffers."""

    device: str = "cuda"

    def __post_init__(self):
        ort = require("onnxruntime", "runtime")
        if self.buffers is None:
            n = self.batch * self.io.num_kv_heads * self.capacity * self.io.head_dim
            dt = np.dtype(self.io.kv_dtype).type
            self.buffers = [[tuple(ort.OrtValue.ortvalue_from_shape_and_type([n], dt, self.device, 0) for _ in range(2))
                             for _ in range(2)] for _ in range(self.io.num_layers)]
        super().__post_init__()

    @property
    def nbytes(self) -> int:
        return 4 * self.io.num_layers * self.batch * self.io.num_kv_heads * self.capacity * self.io.head_dim * np.dtype(self.io.kv_dtype).itemsize

    def _shape(self, length: int) -> tuple[int, ...]:
        return (self.batch, self.io.num_kv_heads, length, self.io.head_dim)

    def binding(self, layer: int, kind: int, new: int | None = None) -> tuple[int, tuple[int, ...]]:
        which = self.current if new is None else 1 - self.current
        return self.buffers[layer][kind][which].data_ptr(), self._shape(self.length + (new or 0))

    def past(self, layer: int, kind: int) -> np.ndarray:
        return self.host_past(layer, kind)

    def host_past(self, layer: int, kind: int) -> np.ndarray:
        """A host copy of the past view (used by select/merge, never per step)."""
        n = int(np.prod(self._shape(self.length)))
        return self.buffers[layer][kind][self.current].numpy()[:n].reshape(self._shape(self.length))

    def store_past(self, layer: int, kind: int, value: np.ndarray) -> None:
        flat = np.zeros(self.buffers[layer][kind][self.current].shape(), value.dtype)
        flat[: value.size] = value.ravel()
        self.buffers[layer][kind][self.current].update_inplace(flat)

    def _empty(self, batch: int, capacity: int) -> "KVCache":
        return OrtValueKVCache(self.io, batch, capacity, device=self.device)
