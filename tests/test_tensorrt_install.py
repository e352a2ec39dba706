"""The Jetson install: `doctor` finds both onnxruntime wheels, or a Jetson without the CUDA provider, and
says how to fix it; the [jetson] extra carries no CPU onnxruntime; TensorRT targets refuse INT4 groups
TensorRT cannot run."""

import sys
import tomllib
import types
from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.runtime.platform import doctor

ROOT = Path(__file__).resolve().parents[1]


def dist(name):
    return types.SimpleNamespace(metadata={"Name": name})


def platform(jetson=True):
    return types.SimpleNamespace(board=lambda: types.SimpleNamespace(is_jetson=jetson))


def fake_ort(monkeypatch, providers):
    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(__version__="1.20.0", get_available_providers=lambda: providers))
    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda name: object())


def test_both_onnxruntime_wheels_fail_with_the_fix(monkeypatch):
    monkeypatch.setattr("importlib.metadata.distributions", lambda: [dist("onnxruntime"), dist("onnxruntime_gpu"), dist("numpy")])
    check = doctor._onnxruntime(platform(), doctor.DoctorOptions(emulated=False))
    assert check.status == doctor.FAIL and "both onnxruntime and onnxruntime-gpu" in check.detail
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in check.fix and "edge-sdk[jetson]" in check.fix


@pytest.mark.parametrize("jetson,emulated,status", [(True, False, "fail"), (True, True, "warn"), (False, False, "warn")])
def test_no_cuda_provider(monkeypatch, jetson, emulated, status):
    monkeypatch.setattr("importlib.metadata.distributions", lambda: [dist("onnxruntime-gpu")])
    fake_ort(monkeypatch, ["CPUExecutionProvider"])
    check = doctor._onnxruntime(platform(jetson), doctor.DoctorOptions(emulated=emulated))
    assert check.status == status and "no CUDA provider" in check.detail and "onnxruntime-gpu wheel" in check.fix


def test_gpu_wheel_alone_passes(monkeypatch):
    monkeypatch.setattr("importlib.metadata.distributions", lambda: [dist("onnxruntime-gpu")])
    fake_ort(monkeypatch, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert doctor._onnxruntime(platform(), doctor.DoctorOptions(emulated=False)).status == doctor.PASS


def test_jetson_extra_has_no_cpu_onnxruntime_and_has_cuda_python():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names_of(extra):
        out = []
        for r in extras[extra]:
            if r.startswith("edge-sdk["):
                out += [n for e in r[len("edge-sdk["):-1].split(",") for n in names_of(e)]
            else:
                out.append(r.split(">")[0].split("=")[0].split(";")[0].strip())
        return out

    names = names_of("jetson")
    assert "onnxruntime" not in names and "onnxruntime-gpu" not in names  # NVIDIA's wheel is installed by hand
    assert "cuda-python" in names
    runtime = set(names_of("runtime")) - {"onnxruntime"}
    assert runtime <= set(names)  # everything else the runtime needs


@pytest.mark.parametrize("group", [32, 96, 256])
def test_fp16_graph_conversion_refuses_groups_tensorrt_cannot_run(group):
    from edge_sdk.converters.options import ConvertOptions

    with pytest.raises(ConfigError, match="TensorRT"):
        ConvertOptions(group_size=group, graphs=("fp32", "fp16"))
    ConvertOptions(group_size=group if group != 96 else 64)  # the CPU path keeps its choice


def test_cuda_python_falls_back_to_cuda_cudart(monkeypatch):
    from edge_sdk.runtime.backends.tensorrt import load_cudart

    legacy = types.ModuleType("cuda.cudart")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)  # None in sys.modules: ImportError
    monkeypatch.setitem(sys.modules, "cuda.cudart", legacy)
    assert load_cudart() is legacy
