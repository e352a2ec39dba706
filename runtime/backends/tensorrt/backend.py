"""Native TensorRT backend: a prebuilt engine from the engine cache, KV cache resident on the GPU.

Device memory and copies go through `cuda.bindings.runtime` (cuda-python). Profile 0 runs prefill,
profile 1 decode steps (see tensorrt_build.profiles). Runs only where TensorRT and a GPU exist.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from edge_sdk.errors import NotBuiltError, RuntimeBackendError, require

from .. import engine_cache as ec
from ..base import check_step
from ..kv_cache import KVCache, ModelIO
from . import require_tensorrt

PREFILL, DECODE = 0, 1


def _check(result):
    """cuda.bindings calls return (err, *values); raise on a non-zero error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeBackendError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else values


class DeviceKVCache(KVCache):
    """KVCache whose two buffers per layer and kind are device allocations (integers: pointers)."""

    def __post_init__(self):
        cudart = require("cuda.bindings.runtime", "runtime")
        n = self.batch * self.io.num_kv_heads * self.capacity * self.io.head_dim * np.dtype(self.io.kv_dtype).itemsize
        self._cudart, self._bytes = cudart, n
        self.buffers = [[(_check(cudart.cudaMalloc(n)), _check(cudart.cudaMalloc(n))) for _ in range(2)]
                        for _ in range(self.io.num_layers)]
        super().__post_init__()

    @property
    def nbytes(self) -> int:
        return 4 * self.io.num_layers * self._bytes

    def _view(self, ptr: int, length: int):
        return int(ptr), (self.batch, self.io.num_kv_heads, length, self.io.head_dim)

    def select(self, rows):
        raise NotBuiltError("select/merge of device KV caches is not implemented", hint="use the onnxruntime backend for continuous batching")

    def free(self):
        for layer in self.buffers:
            for pair in layer:
                for ptr in pair:
                    self._cudart.cudaFree(ptr)
        self.buffers = []

    def __del__(self):
        if getattr(self, "buffers", None) and hasattr(self, "_cudart"):
            self.free()


class TensorRTBackend:
    provider = "tensorrt"

    def __init__(self, engine_path: Path, io: ModelIO, trt):
        self._cudart = cudart = require("cuda.bindings.runtime", "runtime")
        self.trt, self.engine_path = trt, engine_path
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeBackendError(f"{engine_path}: TensorRT could not deserialize the engine",
                                      hint="rebuild it with `edge-sdk engine build --force`")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        past0 = io.past_name.format(i=0, kind="key")
        kv_dtype = "float16" if self.engine.get_tensor_dtype(past0) == trt.DataType.HALF else "float32"
        self.io = ModelIO(**{**asdict(io), "kv_dtype": kv_dtype})
        self._profile = None
        self._scratch: dict[str, tuple[int, int]] = {}  # name -> (device ptr, bytes)

    @classmethod
    def from_cache(cls, bundle: Path, io: ModelIO, options) -> "TensorRTBackend":
        trt = require_tensorrt()
        board = options.target_board or "local"
        root = options.engine_root(bundle)
        engine = ec.lookup_bundle(root, board, trt.__version__, ec.bundle_hash(bundle))
        if engine is None:
            raise NotBuiltError(f"no TensorRT engine for {bundle} on {board} with TensorRT {trt.__version__}",
                                hint=f"build it first: edge-sdk engine build {bundle} --board {board}")
        return cls(engine, io, trt)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return DeviceKVCache(self.io, batch, capacity)

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._scratch.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._cudart.cudaFree(ptr)
            ptr = _check(self._cudart.cudaMalloc(max(nbytes, 256)))
            self._scratch[name] = (ptr, max(nbytes, 256))
        return ptr

    def _upload(self, name: str, arr: np.ndarray) -> None:
        ptr = self._device(name, arr.nbytes)
        _check(self._cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes,
                                            self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        self.context.set_input_shape(name, arr.shape)
        self.context.set_tensor_address(name, ptr)

    def forward(self, input_ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None = None) -> np.ndarray:
        ids, mask = check_step(input_ids, cache, new_mask)
        attn, pos = cache.step_inputs(mask)
        profile = PREFILL if cache.length == 0 and ids.shape[1] > 1 else DECODE
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, self.stream)
            self._profile = profile
        for name, arr in (("input_ids", ids), ("attention_mask", attn), ("position_ids", pos)):
            self._upload(name, arr)
        new = ids.shape[1]
        for layer in range(self.io.num_layers):
            for k, kind in enumerate(("key", "value")):
                ptr, shape = cache.past(layer, k)
                self.context.set_input_shape(self.io.past_name.format(i=layer, kind=kind), shape)
                self.context.set_tensor_address(self.io.past_name.format(i=layer, kind=kind), ptr)
                ptr, _ = cache.present_target(layer, k, new)
                self.context.set_tensor_address(self.io.present_name.format(i=layer, kind=kind), ptr)
        logits = np.empty((ids.shape[0], new, self.io.vocab_size), np.float32)
        out = self._device("logits", logits.nbytes)
        self.context.set_tensor_address("logits", out)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeBackendError("TensorRT execution failed (see the TensorRT log)")
        _check(self._cudart.cudaMemcpyAsync(logits.ctypes.data, out, logits.nbytes,
                                            self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(self._cudart.cudaStreamSynchronize(self.stream))
        cache.advance(mask)
        return logits

    def describe(self) -> dict:
        return {"backend": "tensorrt", "provider": "tensorrt", "engine": str(self.engine_path),
                "tensorrt_version": self.trt.__version__, "kv_dtype": self.io.kv_dtype}
