"""TensorRT engine build around the TensorRT calls: flags, profiles, workspace, timing cache,
cache keys and invalidation, metadata, atomic writes; the CLI without TensorRT.

A recording stand-in for the `tensorrt` module implements the documented calls the builder uses;
the real build runs only where TensorRT exists (the gpu-marked test).
"""

import json
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.bundle import write_manifest
from edge_sdk.errors import ConfigError, NotBuiltError, RuntimeBackendError
from edge_sdk.runtime.backends import engine_cache as ec
from edge_sdk.runtime.backends.kv_cache import ModelIO
from edge_sdk.runtime.backends.tensorrt.build import EngineBuildSettings, build_engine, profiles

MANIFEST = {
    "format": "edge-sdk-bundle",
    "architecture": {"vocab_size": 32, "max_position_embeddings": 4096},
    "graphs": {"fp32": {"file": "model.onnx"}, "fp16": {"file": "model.fp16.onnx"}},
    "io": {"kv": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "layout": "BHSD"}},
    "tokenizer": {},
}


def fake_trt(version="10.3.0", parse_ok=True, build_ok=True):
    calls = []

    class Logger:
        WARNING = 2

        def __init__(self, level):
            calls.append(("Logger", level))

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (name, lo, opt, hi)
            self.shapes[name] = (lo, opt, hi)

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+tuned"

    class Config:
        def __init__(self):
            self.profiles, self.pool, self.timing, self.progress_monitor = [], {}, None, None
            self.builder_optimization_level = None

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def add_optimization_profile(self, p):
            self.profiles.append(p)

        def create_timing_cache(self, data):
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing = cache

        def get_timing_cache(self):
            return self.timing

    class Builder:
        def __init__(self, logger):
            self.config = None

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return object()

        def create_builder_config(self):
            self.config = Config()
            calls.append(("config", self.config))
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build", config))
            if config.progress_monitor:
                config.progress_monitor.phase_start("Building", None, 3)
                assert config.progress_monitor.step_complete("Building", 0) is True
                config.progress_monitor.phase_finish("Building")
            return b"ENGINE:" + config.timing.data if build_ok else None

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", Path(path).name))
            return parse_ok

        def get_error(self, i):
            return "In node 3 (DequantizeLinear): unsupported INT4 block"

    class IProgressMonitor:
        def __init__(self):
            pass

    trt = types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, IProgressMonitor=IProgressMonitor,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"))
    return trt, calls


@pytest.fixture()
def bundle(tmp_path):
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"fp32 graph")
    (d / "model.fp16.onnx").write_bytes(b"fp16 graph")
    write_manifest(d, MANIFEST)
    return d


def build(bundle, trt, **kw):
    kw.setdefault("settings", EngineBuildSettings(max_batch=2, max_prompt=64, max_seq_len=256, opt_prompt=16, opt_past=64))
    return build_engine(bundle, json.loads((bundle / "manifest.json").read_text()), "agx-orin-64gb", trt,
                        cache_root=bundle.parent / "engines", report=lambda m: None, **kw)


def test_strongly_typed_fp16_graph_profiles_and_workspace(bundle):
    trt, calls = fake_trt()
    path, built = build(bundle, trt)
    assert built and path.read_bytes() == b"ENGINE:"
    assert ("create_network", 1 << 1) in calls and ("parse", "model.fp16.onnx") in calls
    config = next(c for n, c in calls if n == "config")
    assert config.pool == {"workspace": 1024 << 20}
    prefill, chunk, decode = (p.shapes for p in config.profiles)
    assert prefill["input_ids"] == ((1, 1), (1, 16), (2, 64))
    assert prefill["past_key_values.1.value"] == ((1, 2, 0, 8), (1, 2, 0, 8), (2, 2, 0, 8))
    assert chunk["input_ids"] == ((1, 1), (1, 16), (2, 64))
    assert chunk["past_key_values.0.key"] == ((1, 2, 1, 8), (1, 2, 64, 8), (2, 2, 255, 8))
    assert chunk["attention_mask"] == ((1, 2), (1, 80), (2, 255 + 64))
    assert decode["input_ids"] == ((1, 1), (1, 1), (2, 1))
    assert decode["attention_mask"] == ((1, 1), (1, 65), (2, 256))
    assert decode["past_key_values.0.key"] == ((1, 2, 0, 8), (1, 2, 64, 8), (2, 2, 255, 8))
    assert len(prefill) == len(chunk) == len(decode) == 3 + 2 * 2


def test_metadata_written_with_engine(bundle):
    trt, _ = fake_trt()
    path, _ = build(bundle, trt)
    meta = json.loads((path.parent / ec.METADATA).read_text())
    assert meta["tensorrt_version"] == "10.3.0" and meta["board"] == "agx-orin-64gb"
    assert meta["bundle_hash"] == ec.bundle_hash(bundle) and meta["engine_bytes"] == path.stat().st_size
    assert meta["settings"]["max_seq_len"] == 256 and len(meta["profiles"]) == 3
    assert meta["limits"] == {"max_batch": 2, "max_prompt": 64, "max_seq_len": 256}
    assert meta["graph"] == "model.fp16.onnx" and meta["graph_kind"] == "fp16"
    assert not list(path.parent.parent.glob(".*partial*"))


def test_cache_hit_skips_build_and_timing_cache_persists(bundle):
    trt, calls = fake_trt()
    first, built = build(bundle, trt)
    timing = bundle.parent / "engines" / "agx-orin-64gb" / "trt-10.3.0" / "timing.cache"
    assert built and timing.read_bytes() == b"+tuned"
    second, built = build(bundle, trt)
    assert second == first and not built and sum(n == "build" for n, _ in calls) == 1
    # a forced rebuild starts from the saved timing cache
    third, built = build(bundle, trt, force=True)
    assert built and third.read_bytes() == b"ENGINE:+tuned" and timing.read_bytes() == b"+tuned+tuned"


@pytest.mark.parametrize("change", ["tensorrt", "bundle", "settings", "board"])
def test_key_change_invalidates(bundle, change):
    trt, _ = fake_trt()
    first, _ = build(bundle, trt)
    kw = {}
    if change == "tensorrt":
        trt, _ = fake_trt(version="10.4.0")
    elif change == "bundle":
        (bundle / "model.fp16.onnx").write_bytes(b"other graph")
        write_manifest(bundle, MANIFEST)
    elif change == "settings":
        kw["settings"] = EngineBuildSettings(max_seq_len=1024)
    if change == "board":
        path, built = build_engine(bundle, MANIFEST, "orin-nx-16gb", trt, cache_root=bundle.parent / "engines",
                                   settings=EngineBuildSettings(max_batch=2, max_prompt=64, max_seq_len=256, opt_prompt=16, opt_past=64),
                                   report=lambda m: None)
    else:
        path, built = build(bundle, trt, **kw)
    assert built and path != first


def test_stale_or_partial_entry_is_not_used(bundle, tmp_path):
    key = ec.EngineKey("agx-orin-64gb", "10.3.0", "a" * 64)
    root = tmp_path / "engines"
    path = ec.write_entry(root, key, b"xyz", {})
    assert ec.lookup(root, key) == path
    path.write_bytes(b"truncated engine")  # size no longer matches the metadata
    assert ec.lookup(root, key) is None
    other = ec.EngineKey("agx-orin-64gb", "10.3.0", "a" * 64, "s")
    assert ec.lookup(root, other) is None
    ec.write_entry(root, other, b"1", {})
    removed = ec.prune(root, other)
    assert removed == [key.directory(root)] and ec.lookup(root, other)


def test_backend_finds_engine_built_with_any_settings(bundle):
    trt, _ = fake_trt()
    path, _ = build(bundle, trt)
    root = bundle.parent / "engines"
    assert ec.lookup_bundle(root, "agx-orin-64gb", "10.3.0", ec.bundle_hash(bundle)) == path
    assert ec.lookup_bundle(root, "agx-orin-64gb", "10.4.0", ec.bundle_hash(bundle)) is None
    assert ec.lookup_bundle(root, "orin-nx-16gb", "10.3.0", ec.bundle_hash(bundle)) is None


def test_parse_failure_names_the_node(bundle):
    trt, _ = fake_trt(parse_ok=False)
    with pytest.raises(RuntimeBackendError, match="DequantizeLinear"):
        build(bundle, trt)
    assert not (bundle.parent / "engines").exists() or not list((bundle.parent / "engines").rglob("engine.plan"))


def test_build_failure_writes_nothing(bundle):
    trt, _ = fake_trt(build_ok=False)
    with pytest.raises(RuntimeBackendError, match="failed to build"):
        build(bundle, trt)
    assert not list((bundle.parent / "engines").rglob("engine.*"))


@pytest.mark.parametrize("kw", [dict(opt_batch=2, max_batch=1), dict(max_prompt=4096, max_seq_len=2048),
                                dict(opt_past=2048, max_seq_len=2048), dict(workspace_mb=1), dict(graph="int8")])
def test_bad_settings(kw):
    with pytest.raises(ConfigError):
        EngineBuildSettings(**kw)


@pytest.mark.parametrize("group", [32, 256])
def test_tensorrt_refuses_int4_groups_other_than_64_and_128(bundle, group):
    manifest = dict(json.loads((bundle / "manifest.json").read_text()), quantization={"group_size": group})
    with pytest.raises(ConfigError, match=f"INT4 group size {group}; TensorRT runs INT4 blocks of 64 or 128 only"):
        build_engine(bundle, manifest, "agx-orin-64gb", fake_trt()[0], cache_root=bundle.parent / "engines", report=lambda m: None)


def test_missing_fp16_graph_is_an_error_not_an_fp32_engine(bundle):
    """Regression: the build parsed model.onnx and recorded graph "fp16"."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["graphs"]["fp16"]
    trt, calls = fake_trt()
    with pytest.raises(ConfigError, match="no fp16 graph"):
        build_engine(bundle, manifest, "agx-orin-64gb", trt, cache_root=bundle.parent / "engines", report=lambda m: None)
    assert not any(n == "parse" for n, _ in calls)


@given(st.integers(1, 4), st.integers(1, 64), st.integers(65, 300), st.data())
@settings(max_examples=200, deadline=None)
def test_every_step_the_runtime_takes_fits_one_profile(max_batch, max_prompt, max_seq_len, data):
    s = EngineBuildSettings(max_batch=max_batch, max_prompt=max_prompt, max_seq_len=max_seq_len, opt_prompt=1, opt_past=0)
    io = ModelIO(1, 2, 8, 100, 4096)
    batch = data.draw(st.integers(1, max_batch))
    seq = data.draw(st.integers(1, max_prompt))
    past = data.draw(st.integers(0, max_seq_len - seq))
    shapes = {"input_ids": (batch, seq), "position_ids": (batch, seq), "attention_mask": (batch, past + seq),
              "past_key_values.0.key": (batch, 2, past, 8), "past_key_values.0.value": (batch, 2, past, 8)}
    fits = [all(all(a <= x <= c for a, x, c in zip(p[n][0], shape, p[n][2])) for n, shape in shapes.items())
            for p in profiles(s, io)]
    assert any(fits), (batch, seq, past)
    for p in profiles(s, io):  # each of min, opt, max is a consistent step: mask = past + seq
        for k in range(3):
            assert p["attention_mask"][k][1] == p["input_ids"][k][1] + p["past_key_values.0.key"][k][2]
            assert p["input_ids"][k][0] <= p["input_ids"][k + 1 if k < 2 else k][0]


def test_profiles_cover_every_graph_input():
    io = ModelIO(3, 4, 16, 100, 1024)
    for prof in profiles(EngineBuildSettings(), io):
        assert set(prof) == {"input_ids", "position_ids", "attention_mask"} | {
            f"past_key_values.{i}.{k}" for i in range(3) for k in ("key", "value")}


def test_cli_engine_build_without_tensorrt(bundle, capsys):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from edge_sdk.cli.main import main

    assert main(["engine", "build", str(bundle), "--emulate", "agx-orin-64gb"]) == NotBuiltError.exit_code
    assert "TensorRT is not installed" in capsys.readouterr().err


@pytest.mark.gpu
def test_real_tensorrt_build(request, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    bundle = request.getfixturevalue("tiny_bundle")("qwen2")
    manifest = json.loads((bundle / "manifest.json").read_text())
    path, built = build_engine(bundle, manifest, "local", trt, cache_root=tmp_path, settings=EngineBuildSettings(max_seq_len=128, max_prompt=64, opt_past=32, opt_prompt=16))
    assert built and path.stat().st_size > 0
