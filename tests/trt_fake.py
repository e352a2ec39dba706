"""A contract stand-in for TensorRT 10's Python build/runtime API and cuda-python's runtime API.

It enforces what the real ones enforce, so a backend that passes here fails on a device only for
reasons the documentation does not state:
- device memory lives at addresses no host pointer can have; a copy checks both ends against the
  allocations and the copy kind, and fresh allocations hold NaN bytes (cudaMalloc does not zero);
- copies and engine runs are queued per stream and run in order at cudaStreamSynchronize (H2D reads
  its pageable source when called); cudaFree waits for every stream, as the real one synchronizes;
- an optimization profile switch drops the input shapes set before; set_input_shape returns False
  outside the active profile's [min, max]; execute_async_v3 returns False unless every input shape
  and every I/O tensor address is set, and checks each binding fits inside its allocation;
- the builder refuses profiles that miss a dynamic input, change a fixed dimension or are not
  min <= opt <= max.
The engine computes through onnxruntime on the CPU from the graph the parser read.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from pathlib import Path

import numpy as np

# --- cuda-python ------------------------------------------------------------------------------


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidMemcpyDirection = 21
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStream_t:
    def __init__(self, handle: int):
        self._handle = handle

    def __int__(self):
        return self._handle

    def getPtr(self):
        return self._handle


class FakeCudart(types.ModuleType):
    BASE = 0x9000_0000_0000  # above the 47-bit user address space: no host pointer can be here

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.cudaError_t, self.cudaMemcpyKind, self.cudaStream_t = cudaError_t, cudaMemcpyKind, cudaStream_t
        self.allocs: dict[int, np.ndarray] = {}
        self.queues: dict[int, list] = {0: []}
        self._next = self.BASE
        self.calls: list[str] = []

    # memory -----------------------------------------------------------------------------------
    def cudaMalloc(self, size):
        self.calls.append("cudaMalloc")
        ptr, self._next = self._next, self._next + ((int(size) + 255) // 256 + 1) * 256
        self.allocs[ptr] = np.full(int(size), 0xFF, np.uint8)  # NaN in float16 and float32
        return cudaError_t.cudaSuccess, ptr

    def cudaFree(self, ptr):
        self._drain_all()  # cudaFree synchronizes
        if int(ptr) not in self.allocs:
            return (cudaError_t.cudaErrorInvalidDevicePointer,)
        del self.allocs[int(ptr)]
        return (cudaError_t.cudaSuccess,)

    def device_view(self, ptr: int, nbytes: int) -> np.ndarray | None:
        """The bytes [ptr, ptr + nbytes) of one allocation, or None when not wholly inside one."""
        for base, buf in self.allocs.items():
            if base <= ptr and ptr + nbytes <= base + buf.size:
                return buf[ptr - base: ptr - base + nbytes]
        return None

    def is_device(self, ptr: int) -> bool:
        return self.BASE <= int(ptr) < self._next

    @staticmethod
    def host_view(ptr: int, nbytes: int) -> np.ndarray:
        return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(int(ptr)))

    # copies -----------------------------------------------------------------------------------
    def _ends(self, dst, src, nbytes, kind):
        """(destination view factory, source bytes factory) or an error code."""
        want = {cudaMemcpyKind.cudaMemcpyHostToDevice: (True, False), cudaMemcpyKind.cudaMemcpyDeviceToHost: (False, True),
                cudaMemcpyKind.cudaMemcpyDeviceToDevice: (True, True)}.get(kind)
        if want is None:
            return cudaError_t.cudaErrorInvalidMemcpyDirection
        if (self.is_device(dst), self.is_device(src)) != want:
            return cudaError_t.cudaErrorInvalidValue
        for p, dev in ((dst, want[0]), (src, want[1])):
            if dev and self.device_view(int(p), nbytes) is None:
                return cudaError_t.cudaErrorInvalidValue
        return None

    def _view(self, ptr, nbytes):
        return self.device_view(int(ptr), nbytes) if self.is_device(ptr) else self.host_view(int(ptr), nbytes)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        self.calls.append(f"cudaMemcpyAsync:{cudaMemcpyKind(kind).name}")
        err = self._ends(dst, src, int(count), kind) if count else None
        if err is not None:
            return (err,)
        if not count:
            return (cudaError_t.cudaSuccess,)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            data = self.host_view(src, count).copy()  # pageable source: staged when called
            return self._enqueue(stream, lambda: self._view(dst, count).__setitem__(slice(None), data))
        return self._enqueue(stream, lambda: self._view(dst, count).__setitem__(slice(None), self._view(src, count)))

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        self.calls.append("cudaMemcpy2DAsync")
        if width > dpitch or width > spitch:
            return (cudaError_t.cudaErrorInvalidValue,)
        span_d, span_s = (height - 1) * dpitch + width, (height - 1) * spitch + width
        for p, n in ((dst, span_d), (src, span_s)):
            if self.is_device(p) and self.device_view(int(p), n) is None:
                return (cudaError_t.cudaErrorInvalidValue,)
        if kind != cudaMemcpyKind.cudaMemcpyDeviceToDevice or not (self.is_device(dst) and self.is_device(src)):
            return (cudaError_t.cudaErrorInvalidValue,)

        def run():
            for row in range(height):
                self._view(dst + row * dpitch, width)[:] = self._view(src + row * spitch, width)
        return self._enqueue(stream, run)

    def cudaMemsetAsync(self, ptr, value, count, stream):
        if self.device_view(int(ptr), int(count)) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return self._enqueue(stream, lambda: self.device_view(int(ptr), int(count)).__setitem__(slice(None), value))

    # streams ----------------------------------------------------------------------------------
    def cudaStreamCreate(self):
        handle = max(self.queues) + 1
        self.queues[handle] = []
        return cudaError_t.cudaSuccess, cudaStream_t(handle)

    def _enqueue(self, stream, fn):
        q = self.queues.get(int(stream))
        if q is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        q.append(fn)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        q = self.queues.get(int(stream))
        if q is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        while q:
            q.pop(0)()
        return (cudaError_t.cudaSuccess,)

    def _drain_all(self):
        for handle in list(self.queues):
            self.cudaStreamSynchronize(handle)

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())


# --- TensorRT ---------------------------------------------------------------------------------


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 9
    BF16 = 7


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


ORT_TYPES = {"tensor(float)": (DataType.FLOAT, np.float32), "tensor(float16)": (DataType.HALF, np.float16),
             "tensor(int64)": (DataType.INT64, np.int64), "tensor(int32)": (DataType.INT32, np.int32)}


def _session(graph: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


class Logger:
    WARNING = 2

    def __init__(self, level=2):
        self.level = level


class Profile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class Network:
    graph: str | None = None


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path):
        self.network.graph = str(path)
        return Path(path).is_file()

    def get_error(self, i):
        return "no such file"


class TimingCache:
    def __init__(self, data: bytes):
        self.data = bytes(data)

    def serialize(self):
        return self.data


class BuilderConfig:
    def __init__(self):
        self.profiles, self.progress_monitor, self.builder_optimization_level, self.timing = [], None, 3, None

    def set_memory_pool_limit(self, pool, size):
        pass

    def add_optimization_profile(self, p):
        self.profiles.append(p)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return TimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing = cache
        return True

    def get_timing_cache(self):
        return self.timing


class BuildError(AssertionError):
    pass


class Builder:
    def __init__(self, logger):
        pass

    def create_network(self, flags):
        return Network()

    def create_builder_config(self):
        return BuilderConfig()

    def create_optimization_profile(self):
        return Profile()

    def build_serialized_network(self, network, config):
        sess = _session(network.graph)
        for i, p in enumerate(config.profiles):
            for inp in sess.get_inputs():
                dims = inp.shape
                if inp.name not in p.shapes:
                    raise BuildError(f"profile {i} has no shapes for input {inp.name}")
                lo, opt, hi = p.shapes[inp.name]
                if not len(lo) == len(opt) == len(hi) == len(dims):
                    raise BuildError(f"profile {i} {inp.name}: rank {len(lo)} != {len(dims)}")
                if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                    raise BuildError(f"profile {i} {inp.name}: not min <= opt <= max: {lo} {opt} {hi}")
                for d, a, c in zip(dims, lo, hi):
                    if isinstance(d, int) and not a == c == d:
                        raise BuildError(f"profile {i} {inp.name}: fixed dimension {d} given as {a}..{c}")
        return json.dumps({"graph": network.graph, "profiles": [
            {n: [list(x) for x in v] for n, v in p.shapes.items()} for p in config.profiles]}).encode()


class Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, data):
        try:
            plan = json.loads(bytes(data))
        except ValueError:
            return None
        return Engine(plan)


class Engine:
    def __init__(self, plan):
        self.session = _session(plan["graph"])
        self.plan = plan
        self.modes = {i.name: TensorIOMode.INPUT for i in self.session.get_inputs()}
        self.modes.update({o.name: TensorIOMode.OUTPUT for o in self.session.get_outputs()})
        self.types = {t.name: ORT_TYPES[t.type] for t in (*self.session.get_inputs(), *self.session.get_outputs())}
        self.names = list(self.modes)

    @property
    def num_io_tensors(self):
        return len(self.names)

    @property
    def num_optimization_profiles(self):
        return len(self.plan["profiles"])

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.modes.get(name, TensorIOMode.NONE)

    def get_tensor_dtype(self, name):
        return self.types[name][0]

    def get_tensor_profile_shape(self, name, profile_index):
        if self.modes.get(name) != TensorIOMode.INPUT:
            raise RuntimeError(f"{name} is not an input tensor")
        return [tuple(s) for s in self.plan["profiles"][profile_index][name]]

    def create_execution_context(self):
        return Context(self)


class Context:
    def __init__(self, engine: Engine):
        self.engine, self.profile = engine, 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.errors: list[str] = []
        self.executions: list[int] = []  # the profile of each run

    def _err(self, msg):
        self.errors.append(msg)
        return False

    def set_optimization_profile_async(self, profile_index, stream_handle):
        if not isinstance(stream_handle, int):
            raise TypeError("stream_handle must be an int")
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            return self._err(f"profile {profile_index} out of range")
        self.profile, self.shapes = profile_index, {}  # every dynamic shape must be set again
        return True

    def set_input_shape(self, name, shape):
        if self.engine.modes.get(name) != TensorIOMode.INPUT:
            return self._err(f"{name} is not an input")
        lo, _, hi = self.engine.plan["profiles"][self.profile][name]
        shape = tuple(int(x) for x in shape)
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return self._err(f"{name} {shape} outside profile {self.profile} [{lo}, {hi}]")
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, memory):
        if name not in self.engine.modes:
            return self._err(f"{name} is not an I/O tensor")
        if not isinstance(memory, int):
            raise TypeError("memory must be an int")
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle):
        if not isinstance(stream_handle, int):
            raise TypeError("stream_handle must be an int")
        inputs = [n for n, m in self.engine.modes.items() if m == TensorIOMode.INPUT]
        missing = [n for n in inputs if n not in self.shapes]
        if missing:
            return self._err(f"input shapes not set: {missing[:3]}")
        unbound = [n for n in self.engine.names if n not in self.addresses]
        if unbound:
            return self._err(f"tensor addresses not set: {unbound[:3]}")
        cudart = CUDART
        feeds_spec = {n: (self.addresses[n], self.shapes[n], self.engine.types[n][1]) for n in inputs}
        for n, (ptr, shape, dt) in feeds_spec.items():
            if cudart.device_view(ptr, int(np.prod(shape)) * np.dtype(dt).itemsize) is None:
                return self._err(f"{n}: {ptr:#x} is not device memory holding {shape} {np.dtype(dt).name}")
        outputs = {n: self.addresses[n] for n in self.engine.names if n not in feeds_spec}
        self.executions.append(self.profile)

        def run():
            feeds = {n: cudart.device_view(p, int(np.prod(s)) * np.dtype(dt).itemsize).view(dt).reshape(s).copy()
                     for n, (p, s, dt) in feeds_spec.items()}
            results = self.engine.session.run(list(outputs), feeds)
            for (n, ptr), value in zip(outputs.items(), results):
                value = np.ascontiguousarray(value, self.engine.types[n][1])
                dst = cudart.device_view(ptr, value.nbytes)
                if dst is None:
                    raise AssertionError(f"output {n} {value.shape} overruns its device buffer at {ptr:#x}")
                dst[:] = value.view(np.uint8).reshape(-1)
        return cudart._enqueue(stream_handle, run)[0] == cudaError_t.cudaSuccess


class IProgressMonitor:
    def __init__(self):
        pass


CUDART = FakeCudart()


def install(monkeypatch) -> tuple[types.SimpleNamespace, FakeCudart]:
    """Fresh fakes, installed as `tensorrt` and `cuda.bindings.runtime`; returns (trt, cudart)."""
    global CUDART
    CUDART = FakeCudart()
    trt = types.SimpleNamespace(
        __version__="10.3.0", Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        IProgressMonitor=IProgressMonitor, DataType=DataType, TensorIOMode=TensorIOMode,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE=0))
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt)
    monkeypatch.setitem(__import__("sys").modules, "cuda.bindings.runtime", CUDART)
    return trt, CUDART

