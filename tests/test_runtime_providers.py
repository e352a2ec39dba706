"""onnxruntime provider choice and TensorRT EP cache options; runtime option validation."""

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.runtime.backends import providers as prov
from edge_sdk.runtime.backends.engine_cache import EngineKey
from edge_sdk.runtime.options import RuntimeOptions

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("requested,available,expected", [
    ("auto", ALL, ALL),
    ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("auto", ["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ("cuda", ALL, ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("tensorrt-ep", ALL, ALL),
    ("cpu", ALL, ["CPUExecutionProvider"]),
])
def test_provider_order(requested, available, expected):
    assert prov.choose(requested, available) == expected


def test_unavailable_provider_names_what_exists():
    with pytest.raises(ConfigError, match="offers: AzureExecutionProvider, CPUExecutionProvider"):
        prov.choose("tensorrt-ep", ["AzureExecutionProvider", "CPUExecutionProvider"])


def test_graph_kind_follows_first_provider():
    assert prov.graph_kind(["CPUExecutionProvider"]) == "fp32"
    assert prov.graph_kind(["CUDAExecutionProvider", "CPUExecutionProvider"]) == "fp16"


def test_trt_ep_caches_keyed_by_board_version_bundle(tmp_path):
    key = EngineKey("orin-nx-16gb", "10.3.0", "ab" * 32)
    opts = prov.trt_ep_options(tmp_path, key, workspace_bytes=1 << 30,
                               profiles=[{"input_ids": ((1, 1), (1, 128), (4, 512)), "attention_mask": ((1, 1), (1, 640), (4, 2048))}])
    assert opts["trt_engine_cache_path"] == str(tmp_path / "orin-nx-16gb" / "trt-10.3.0" / ("ab" * 8))
    assert opts["trt_timing_cache_path"] == str(tmp_path / "orin-nx-16gb" / "trt-10.3.0")
    assert opts["trt_engine_cache_enable"] == opts["trt_timing_cache_enable"] == "True"
    assert opts["trt_max_workspace_size"] == str(1 << 30)
    assert opts["trt_profile_max_shapes"] == "input_ids:4x512,attention_mask:4x2048"
    other = prov.trt_ep_options(tmp_path, EngineKey("orin-nx-16gb", "10.4.0", "ab" * 32))
    assert other["trt_engine_cache_path"] != opts["trt_engine_cache_path"]


def test_with_options_pairs_only_configured():
    assert prov.with_options(ALL[1:], {"CUDAExecutionProvider": {"device_id": "0"}}) == [
        ("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]


@pytest.mark.parametrize("kw", [dict(accuracy_level=7), dict(max_batch=0), dict(max_seq_len=1),
                                dict(board="agx-orin-64gb", emulate="orin-nx-16gb")])
def test_bad_options(kw):
    with pytest.raises(ConfigError):
        RuntimeOptions(**kw)


def test_load_options_ignore_the_environment(monkeypatch):
    monkeypatch.setenv("EDGE_SDK_EMULATE", "orin-nano-8gb")  # the CLI's default for --emulate, not load()'s
    assert RuntimeOptions.from_kwargs().target_board is None
    assert RuntimeOptions.from_kwargs(emulate="orin-nano-8gb").target_board == "orin-nano-8gb"
    assert RuntimeOptions(threads=3).num_threads == 3 and RuntimeOptions().num_threads >= 1
