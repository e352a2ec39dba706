"""Native TensorRT backend: a prebuilt engine from the engine cache, KV cache resident on the GPU.

Device memory and copies go through cuda-python's runtime API (`cuda.bindings.runtime`, or the older
`cuda.cudart`). The engine holds the profiles of build.profiles (prefill, chunked prefill, decode);
each step runs on the tightest profile whose ranges admit its shapes, read from the engine itself
(`get_tensor_profile_shape`). Prompt chunks, context and batch are capped by the limits the build
recorded in engine.json. Runs only where TensorRT and a GPU exist; tests/trt_fake.py is the contract
stand-in the suite runs it against.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edge_sdk.errors import ConfigError, MemoryBudgetError, NotBuiltError, RuntimeBackendError

from .. import engine_cache as ec
from ..base import check_step
from ..kv_cache import KVCache, ModelIO
from . import load_cudart, require_tensorrt

Shape = tuple[int, ...]


def _check(result):
    """cuda-python calls return (err, *values); raise on a non-zero error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeBackendError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else (values or None)


class DeviceKVCache(KVCache):
    """KVCache whose two buffers per layer and kind are device allocations (integers: pointers).

    select/merge/stack gather rows on the device (cudaMemcpy2DAsync, one copy per row, layer and
    kind, on the backend's stream); nothing goes through the host."""

    stream = 0  # the backend's CUDA stream (set by TensorRTBackend.new_cache)

    def __post_init__(self):
        cudart = load_cudart()
        n = self.batch * self.io.num_kv_heads * self.capacity * self.io.head_dim * np.dtype(self.io.kv_dtype).itemsize
        self._cudart, self._bytes = cudart, n
        if self.buffers is None:
            self.buffers = [[(_check(cudart.cudaMalloc(n)), _check(cudart.cudaMalloc(n))) for _ in range(2)]
                            for _ in range(self.io.num_layers)]
        super().__post_init__()

    @property
    def nbytes(self) -> int:
        return 4 * self.io.num_layers * self._bytes

    def _view(self, ptr: int, length: int):
        return int(ptr), (self.batch, self.io.num_kv_heads, length, self.io.head_dim)

    def binding(self, layer: int, kind: int, new: int | None = None) -> tuple[int, Shape]:
        return self.past(layer, kind) if new is None else self.present_target(layer, kind, new)

    def _empty(self, batch: int, capacity: int) -> "DeviceKVCache":
        out = DeviceKVCache(self.io, batch, capacity)
        out.stream = self.stream
        return out

    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        kinds = self._cudart.cudaMemcpyKind
        _check(self._cudart.cudaMemcpyAsync(dst, src, nbytes, getattr(kinds, f"cudaMemcpy{kind}"), self.stream))

    def host_past(self, layer: int, kind: int) -> np.ndarray:
        ptr, shape = self.past(layer, kind)
        out = np.empty(shape, self.io.kv_dtype)
        if out.nbytes:
            self._copy(out.ctypes.data, ptr, out.nbytes, "DeviceToHost")
            _check(self._cudart.cudaStreamSynchronize(self.stream))
        return out

    def store_past(self, layer: int, kind: int, value: np.ndarray) -> None:
        ptr, shape = self.past(layer, kind)
        value = np.ascontiguousarray(value, self.io.kv_dtype).reshape(shape)
        if value.nbytes:
            self._copy(ptr, value.ctypes.data, value.nbytes, "HostToDevice")
            _check(self._cudart.cudaStreamSynchronize(self.stream))

    def _gather(self, parts: list[tuple["KVCache", int, int]], capacity: int) -> "KVCache":
        if any(not isinstance(c, DeviceKVCache) for c, _, _ in parts):
            raise ConfigError("cannot merge device and host KV caches", hint="use one backend for every sequence")
        length = max(c.length - start for c, _, start in parts)
        out = self._empty(len(parts), capacity)
        out.check_room(length)
        mask = np.zeros((len(parts), length), np.int64)
        for row, (c, r, start) in enumerate(parts):
            mask[row, length - (c.length - start):] = c.mask[r, start:]
        out.mask = mask
        h, d, size = self.io.num_kv_heads, self.io.head_dim, np.dtype(self.io.kv_dtype).itemsize
        cudart, d2d = self._cudart, self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for layer in range(self.io.num_layers):
            for kind in range(2):
                dst, _ = out.past(layer, kind)
                # cudaMalloc memory is not zeroed: the padding must be finite (0 x NaN is NaN in attention)
                _check(cudart.cudaMemsetAsync(dst, 0, len(parts) * h * length * d * size, self.stream))
                for row, (c, r, start) in enumerate(parts):
                    n = c.length - start
                    if n == 0:
                        continue
                    src, _ = c.past(layer, kind)  # [B, H, c.length, D], contiguous
                    _check(cudart.cudaMemcpy2DAsync(dst + ((row * h) * length + length - n) * d * size, length * d * size,
                                                    src + ((r * h) * c.length + start) * d * size, c.length * d * size,
                                                    n * d * size, h, d2d, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))  # the sources may be freed once this returns
        return out

    def free(self):
        for layer in self.buffers or []:
            for pair in layer:
                for ptr in pair:
                    self._cudart.cudaFree(ptr)
        self.buffers = []

    def __del__(self):
        if getattr(self, "buffers", None) and hasattr(self, "_cudart"):
            self.free()


def engine_limits(engine_path: Path) -> dict:
    """max_batch / max_prompt / max_seq_len the engine was built for, from its engine.json (checked)."""
    meta_path = engine_path.parent / ec.METADATA
    try:
        limits = json.loads(meta_path.read_text())["limits"]
        out = {k: limits[k] for k in ("max_batch", "max_prompt", "max_seq_len")}
        if not all(type(v) is int and v >= 1 for v in out.values()):
            raise ValueError(out)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeBackendError(f"{meta_path}: no valid engine limits ({type(exc).__name__}: {exc})",
                                  hint="rebuild the engine with `edge-sdk engine build --force`") from None
    return out


class TensorRTBackend:
    provider = "tensorrt"
    kv_copies = 2

    def __init__(self, engine_path: Path, io: ModelIO, trt):
        self._cudart = cudart = load_cudart()
        self.trt, self.engine_path = trt, engine_path
        self.limits = engine_limits(engine_path)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeBackendError(f"{engine_path}: TensorRT could not deserialize the engine",
                                      hint="rebuild it with `edge-sdk engine build --force`")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.inputs = [n for n in map(self.engine.get_tensor_name, range(self.engine.num_io_tensors))
                       if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.profiles = [{n: tuple(tuple(int(x) for x in dims) for dims in self.engine.get_tensor_profile_shape(n, p))
                          for n in self.inputs} for p in range(self.engine.num_optimization_profiles)]
        kv_dtype = self._numpy_dtype(io.past_name.format(i=0, kind="key"))
        self.logits_dtype = self._numpy_dtype("logits")
        max_positions = min(io.max_positions, self.limits["max_seq_len"])
        self.io = ModelIO(**{**asdict(io), "kv_dtype": kv_dtype, "max_positions": max_positions})
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

    def _numpy_dtype(self, name: str) -> str:
        dt, types = self.engine.get_tensor_dtype(name), self.trt.DataType
        if dt == types.HALF:
            return "float16"
        if dt == types.FLOAT:
            return "float32"
        raise RuntimeBackendError(f"{self.engine_path}: tensor {name} is {dt}; this runtime reads float16 or float32",
                                  hint="rebuild the engine from the bundle's fp16 or fp32 graph")

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        lim = self.limits
        if batch > lim["max_batch"]:
            raise ConfigError(f"batch {batch} exceeds the TensorRT engine's max_batch {lim['max_batch']}",
                              hint=f"rebuild it with `edge-sdk engine build --max-batch {batch}`, or lower the batch")
        if capacity > lim["max_seq_len"]:
            raise MemoryBudgetError(f"{capacity} tokens of context exceed the TensorRT engine's max_seq_len {lim['max_seq_len']}",
                                    hint=f"rebuild it with `edge-sdk engine build --max-seq-len {capacity}`, or shorten the prompt / max_new_tokens")
        cache = DeviceKVCache(self.io, batch, capacity)
        cache.stream = self.stream
        return cache

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._scratch.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr))
            ptr = _check(self._cudart.cudaMalloc(max(nbytes, 256)))
            self._scratch[name] = (ptr, max(nbytes, 256))
        return ptr

    def choose_profile(self, shapes: dict[str, Shape]) -> int:
        """The tightest profile (smallest max shapes) whose [min, max] admits every input shape."""
        fits = [p for p, table in enumerate(self.profiles)
                if all(_admits(table[n], shape) for n, shape in shapes.items())]
        if fits:
            return min(fits, key=lambda p: sum(math.prod(hi) for _, _, hi in self.profiles[p].values()))
        # name the first tensor no profile admits (else the first: each fits somewhere, never all in one)
        name, shape = next(((n, s) for n, s in shapes.items() if not any(_admits(t[n], s) for t in self.profiles)),
                           next(iter(shapes.items())))
        ranges = " or ".join(f"{t[name][0]}..{t[name][2]}" for t in self.profiles)
        raise RuntimeBackendError(f"no profile of the TensorRT engine admits this step: {name} {shape} (profiles: {ranges})",
                                  hint="rebuild the engine with `edge-sdk engine build --force` and larger --max-prompt / --max-seq-len / --max-batch")

    def _bind(self, name: str, ptr: int, shape: Shape | None = None) -> None:
        if shape is not None and not self.context.set_input_shape(name, shape):
            lo, _, hi = self.profiles[self._profile][name]
            raise RuntimeBackendError(f"TensorRT refused {name} shape {shape}: profile {self._profile} admits {lo}..{hi}",
                                      hint="rebuild the engine with `edge-sdk engine build --force` for these shapes")
        if not self.context.set_tensor_address(name, ptr):
            raise RuntimeBackendError(f"TensorRT refused the address of {name}", hint="a device pointer is expected (see the TensorRT log)")

    def _upload(self, name: str, arr: np.ndarray) -> None:
        ptr = self._device(name, arr.nbytes)
        _check(self._cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes,
                                            self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        self._bind(name, ptr, arr.shape)

    def forward(self, input_ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None = None) -> np.ndarray:
        ids, mask = check_step(input_ids, cache, new_mask)
        if ids.shape[0] > self.limits["max_batch"]:
            raise ConfigError(f"batch {ids.shape[0]} exceeds the TensorRT engine's max_batch {self.limits['max_batch']}",
                              hint="rebuild the engine with a larger --max-batch")
        step = self.limits["max_prompt"]  # longer prompts run in chunks of the engine's longest
        if ids.shape[1] <= step:
            return self._step(ids, cache, mask)
        return np.concatenate([self._step(ids[:, s:s + step], cache, mask[:, s:s + step])
                               for s in range(0, ids.shape[1], step)], axis=1)

    def _step(self, ids: np.ndarray, cache: KVCache, mask: np.ndarray) -> np.ndarray:
        attn, pos = cache.step_inputs(mask)
        batch, new = ids.shape
        pasts = [(self.io.past_name.format(i=layer, kind=kind), self.io.present_name.format(i=layer, kind=kind), layer, k)
                 for layer in range(self.io.num_layers) for k, kind in enumerate(("key", "value"))]
        shapes = {"input_ids": ids.shape, "attention_mask": attn.shape, "position_ids": pos.shape}
        shapes.update((name, cache.past(layer, k)[1]) for name, _, layer, k in pasts)
        profile = self.choose_profile(shapes)
        if profile != self._profile:
            # switching profiles drops the shapes set before: every input is set again below
            if not self.context.set_optimization_profile_async(profile, int(self.stream)):
                raise RuntimeBackendError(f"TensorRT could not switch to optimization profile {profile}")
            self._profile = profile
        for name, arr in (("input_ids", ids), ("attention_mask", attn), ("position_ids", pos)):
            self._upload(name, arr)
        for name, present, layer, k in pasts:
            self._bind(name, *cache.past(layer, k))
            self._bind(present, cache.present_target(layer, k, new)[0])
        logits = np.empty((batch, new, self.io.vocab_size), self.logits_dtype)
        out = self._device("logits", logits.nbytes)
        self._bind("logits", out)
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeBackendError("TensorRT execution failed (see the TensorRT log)")
        _check(self._cudart.cudaMemcpyAsync(logits.ctypes.data, out, logits.nbytes,
                                            self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(self._cudart.cudaStreamSynchronize(self.stream))
        cache.advance(mask)
        return logits.astype(np.float32, copy=False)

    def describe(self) -> dict:
        return {"backend": "tensorrt", "provider": "tensorrt", "engine": str(self.engine_path),
                "tensorrt_version": self.trt.__version__, "kv_dtype": self.io.kv_dtype, "limits": self.limits,
                "profiles": len(self.profiles)}


def _admits(ranges: tuple[Shape, Shape, Shape], shape: Shape) -> bool:
    lo, _, hi = ranges
    return len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
