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
  min <= opt <= max;
- the ONNX parser refuses what onnx-tensorrt's docs/operators.md (10.1 GA, 96e7811) and TensorRT's
  quantization docs state it cannot import (see ParserRules), naming the node as the real parser does.
The engine computes through onnxruntime on the CPU from a self-contained copy of the graph the parser
read (an engine holds its weights: the files the parser read may be gone when it runs).
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


# onnx-tensorrt docs/operators.md (TensorRT 10.x ONNX parser, 10.1 GA): the standard-domain operators marked "Y"
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike
RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# operators.md: "`axes` must be an initializer" (a build-time constant: an initializer or a Constant node's output)
AXES_INPUT = {"ReduceMax": 1, "ReduceMin": 1, "ReduceSum": 1, "ReduceSumSquare": 1, "ReduceMean": 1, "ReduceProd": 1,
              "ReduceL1": 1, "ReduceL2": 1, "ReduceLogSum": 1, "ReduceLogSumExp": 1, "Slice": 3, "Squeeze": 1, "Unsqueeze": 1,
              "CumSum": 1}


class ParserRules:
    """What the parser refuses, each from the documentation:

    - an op outside SUPPORTED_OPS or outside the standard domain (com.microsoft QMoE): "No importer
      registered for op" (onnx-tensorrt operators.md lists standard ops only);
    - `axes` that is not a build-time constant, TopK with sorted != 1 or K >= 3840, ScatterND with a
      reduction, If branches whose outputs share a name (operators.md restrictions);
    - DequantizeLinear (TensorRT "Working with Quantized Types", the Dequantize operator and
      IDequantizeLayer): input INT8 / INT4 / FP8 only (not UINT8 / UINT4); INT4 is weight-only, so an
      INT4 input must be a constant (an initializer); the scale a build-time constant; a zero point, if
      any, all zeros (symmetric only); block quantization (scale of the input's rank) for INT4 only,
      2-D, blocked along one of the last two axes; an INT4 tensor's last dimension even.
    """

    def __init__(self, model):
        self.errors: list[str] = []
        self.inits = {t.name: t for t in model.graph.initializer}
        self.inputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
        self.constant = set(self.inits)
        self.cast_of: dict[str, str] = {}  # a folded Cast's output -> its initializer
        self.check_graph(model.graph)

    def fail(self, i, node, msg):
        self.errors.append(f"In node {i} with name: {node.name} and operator: {node.op_type} ({msg})")

    def check_graph(self, graph):
        self.inits.update({t.name: t for t in graph.initializer})
        self.constant.update(t.name for t in graph.initializer)
        for i, n in enumerate(graph.node):
            self.check(i, n)
            if n.op_type == "Constant" or (n.op_type in ("Cast", "Identity") and all(x in self.constant for x in n.input)):
                self.constant.update(n.output)  # folded at build time
                if n.input:
                    self.cast_of[n.output[0]] = n.input[0]

    def check(self, i, n):
        from onnx import TensorProto, helper

        if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS:
            return self.fail(i, n, f"No importer registered for op: {n.op_type}")
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        k = AXES_INPUT.get(n.op_type)
        if k is not None and len(n.input) > k and n.input[k] and n.input[k] not in self.constant:
            self.fail(i, n, "axes must be an initializer")
        if n.op_type == "TopK":
            if attrs.get("sorted", 1) != 1:
                self.fail(i, n, "sorted must be 1")
            kv = self.values(n.input[1])
            if kv is not None and int(kv.max()) >= 3840:
                self.fail(i, n, "K must be less than 3840")
        if n.op_type == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
            self.fail(i, n, "reduction is not supported")
        if n.op_type == "If":
            then_out = {o.name for o in attrs["then_branch"].output}
            if then_out & {o.name for o in attrs["else_branch"].output}:
                self.fail(i, n, "Output tensors of the two conditional branches must have different names")
            for branch in ("then_branch", "else_branch"):
                self.check_graph(attrs[branch])
        if n.op_type == "DequantizeLinear":
            self.check_dq(i, n, attrs, TensorProto)

    def check_dq(self, i, n, attrs, TensorProto):
        x = self.inits.get(n.input[0])
        kind = x.data_type if x is not None else self.inputs.get(n.input[0])
        if kind in (TensorProto.UINT8, TensorProto.UINT4):
            return self.fail(i, n, "TensorRT only allows FP8, INT8, and INT4 quantization")
        if x is None:
            if kind == TensorProto.INT4:
                self.fail(i, n, "INT4 is weight-only: the input must be a constant initializer")
            return None  # an activation (Q -> DQ, INT8 / FP8)
        if n.input[1] not in self.constant:
            self.fail(i, n, "the scale must be a build-time constant")
        if len(n.input) > 2 and n.input[2]:
            zp = self.values(n.input[2])
            if zp is None or zp.any():
                self.fail(i, n, "TensorRT only supports symmetric quantization: the zero point must be all zeros")
        scale = self.inits.get(n.input[1]) or self.inits.get(self.cast_of.get(n.input[1], ""))
        if kind == TensorProto.INT4 and x.dims[-1] % 2:
            self.fail(i, n, "Quantization to INT4 is not supported for tensors with an odd last dimension")
        if scale is not None and len(scale.dims) == len(x.dims) and len(x.dims) > 1:
            blocked = [a for a, (d, s) in enumerate(zip(x.dims, scale.dims)) if d != s]
            if kind != TensorProto.INT4 or len(x.dims) != 2:
                self.fail(i, n, f"block quantization is 2-D INT4 only, got rank {len(x.dims)}")
            elif len(blocked) != 1 or blocked[0] != attrs.get("axis", 1) % 2:
                self.fail(i, n, "Only a single blocking dimension is allowed")
        elif kind == TensorProto.INT4 and (scale is None or len(scale.dims) > 1):
            self.fail(i, n, "INT4 scale must be a build-time constant of rank 0, 1 or the input's rank")

    def values(self, name):
        import numpy as np
        from onnx import numpy_helper

        t = self.inits.get(name)
        if t is None or t.data_location == 1:
            return None
        return np.asarray(numpy_helper.to_array(t))


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    @property
    def num_errors(self):
        return len(self.errors)

    def parse_from_file(self, path):
        import onnx

        if not Path(path).is_file():
            self.errors = [f"Failed to open file: {path}"]
            return False
        model = onnx.load(str(path), load_external_data=False)
        self.errors = ParserRules(model).errors
        if self.errors:
            return False
        try:
            self.network.graph = _self_contained(path)
        except ValueError as e:
            self.errors = [str(e)]
            return False
        return True

    def get_error(self, i):
        return self.errors[i]


def _self_contained(path) -> str:
    """The graph with its external weights inline, in a file the fake owns (the engine's weights). External
    data is read as onnx-tensorrt's WeightsContext reads it: relative to the graph, no `../`, links followed."""
    import tempfile

    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    for t in _tensors(model.graph):
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            if ".." in Path(info["location"]).parts:
                raise ValueError(f"Relative paths to parent (../) are not allowed in ONNX external weights! {info['location']}")
            with open(Path(path).parent / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                t.raw_data = f.read(int(info["length"]))
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    fd, out = tempfile.mkstemp(suffix=".onnx", dir=ENGINE_DIR)
    with open(fd, "wb") as f:
        f.write(model.SerializeToString())
    return out


def _tensors(graph):
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.g.node:
                yield from _tensors(a.g)


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
ENGINE_DIR: str | None = None  # the fake engines' graphs, removed at exit


def install(monkeypatch) -> tuple[types.SimpleNamespace, FakeCudart]:
    """Fresh fakes, installed as `tensorrt` and `cuda.bindings.runtime`; returns (trt, cudart)."""
    global CUDART, ENGINE_DIR
    CUDART = FakeCudart()
    if ENGINE_DIR is None:
        import atexit
        import shutil
        import tempfile

        ENGINE_DIR = tempfile.mkdtemp(prefix="trt-fake-engines-")
        atexit.register(shutil.rmtree, ENGINE_DIR, True)
    trt = types.SimpleNamespace(
        __version__="10.3.0", Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        IProgressMonitor=IProgressMonitor, DataType=DataType, TensorIOMode=TensorIOMode,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE=0))
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt)
    monkeypatch.setitem(__import__("sys").modules, "cuda.bindings.runtime", CUDART)
    return trt, CUDART

