"""onnxruntime backend: one session over the bundle's graph, IO binding onto the KV cache buffers."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from edge_sdk.errors import RuntimeBackendError, require

from . import providers as prov
from .backend import check_step
from .kv_cache import KVCache, ModelIO

log = logging.getLogger("edge_sdk.runtime")

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
# onnxruntime session config key for the DequantizeLinear+MatMul -> MatMulNBits fusion
QDQ_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


class OrtBackend:
    def __init__(self, graph_path: str | Path, io: ModelIO, *, providers: list, threads: int,
                 accuracy_level: int = 4, optimized_model_path: str | Path | None = None):
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
        try:
            self.session = ort.InferenceSession(str(self.graph_path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RuntimeBackendError(f"onnxruntime could not load {self.graph_path.name}: {exc}",
                                      hint="check the bundle with `edge-sdk verify`, or try provider='cpu'") from exc
        self.threads, self.accuracy_level = threads, accuracy_level
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider in (prov.TRT_EP, prov.CUDA_EP) else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._input_names = set(inputs)
        past0 = io.past_name.format(i=0, kind="key")
        if past0 not in inputs or "input_ids" not in inputs:
            raise RuntimeBackendError(f"{self.graph_path.name} lacks inputs input_ids/{past0} (has {', '.join(sorted(inputs))})",
                                      hint="the graph does not follow the bundle I/O contract: re-convert the model")
        kv_dtype = ORT_TYPES.get(inputs[past0].type)
        if kv_dtype is None:
            raise RuntimeBackendError(f"{past0} has unsupported type {inputs[past0].type}")
        self.io = dataclasses.replace(io, kv_dtype=kv_dtype)
        self._names = [(self.io.past_name.format(i=i, kind=k), self.io.present_name.format(i=i, kind=k))
                       for i in range(self.io.num_layers) for k in ("key", "value")]

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.io, batch, capacity)

    def forward(self, input_ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None = None) -> np.ndarray:
        ids, mask = check_step(input_ids, cache, new_mask)
        attn, pos = cache.step_inputs(mask)
        b = self.session.io_binding()
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
            past = cache.past(layer, kind)
            present = cache.present_target(layer, kind, new)
            # bound by pointer: numpy views of the preallocated buffers, no copy, no allocation
            b.bind_input(past_name, "cpu", 0, dt, list(past.shape), past.ctypes.data)
            b.bind_output(present_name, "cpu", 0, dt, list(present.shape), present.ctypes.data)
        try:
            self.session.run_with_iobinding(b)
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime failed running {self.graph_path.name}: {exc}") from exc
        logits = b.get_outputs()[0].numpy()
        cache.advance(mask)
        return logits

    def describe(self) -> dict:
        return {"backend": "onnxruntime", "provider": self.provider, "providers": self.session.get_providers(),
                "graph": self.graph_path.name, "threads": self.threads, "accuracy_level": self.accuracy_level,
                "kv_dtype": self.io.kv_dtype}
