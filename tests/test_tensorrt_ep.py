"""onnxruntime's TensorRT EP: explicit profiles from the same ranges as the native build, parsed back
from the options string and checked against every dynamic input of the bundle's graph; GPU loads
without an fp16 graph fail loudly."""

import json

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.runtime import loader
from edge_sdk.runtime.backends import providers as prov
from edge_sdk.runtime.backends.engine_cache import EngineKey
from edge_sdk.runtime.backends.kv_cache import ModelIO
from edge_sdk.runtime.backends.tensorrt.build import profiles
from edge_sdk.runtime.options import RuntimeOptions

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle("qwen2")


def ep_options(bundle, tmp_path, **kw):
    manifest = json.loads((bundle / "manifest.json").read_text())
    io = ModelIO.from_manifest(manifest)
    settings = loader.ep_build_settings(io, RuntimeOptions(**kw))
    opts = prov.trt_ep_options(tmp_path, EngineKey("local", "ep", "0" * 64), profiles=profiles(settings, io))
    return manifest, io, settings, opts


@pytest.mark.parametrize("kw", [{}, {"max_batch": 4, "max_seq_len": 300}])
def test_profile_options_cover_every_dynamic_input(bundle, tmp_path, kw):
    manifest, io, settings, opts = ep_options(bundle, tmp_path, **kw)
    parsed = {w: prov.parse_profile_shapes(opts[f"trt_profile_{w}_shapes"]) for w in ("min", "opt", "max")}
    graph = ort.InferenceSession(str(bundle / manifest["graphs"]["fp32"]["file"]), providers=["CPUExecutionProvider"])
    dynamic = [i for i in graph.get_inputs() if any(not isinstance(d, int) for d in i.shape)]
    assert dynamic and {i.name for i in dynamic} == set(parsed["min"]) == set(parsed["max"])
    for inp in dynamic:
        lo, opt, hi = (parsed[w][inp.name] for w in ("min", "opt", "max"))
        assert len(lo) == len(opt) == len(hi) == 3  # prefill, chunk, decode
        for a, b, c in zip(lo, opt, hi):
            assert len(a) == len(inp.shape)
            assert all(x <= y <= z for x, y, z in zip(a, b, c))
            assert all(x == z == d for x, z, d in zip(a, c, inp.shape) if isinstance(d, int))
    # what the runtime asks for lies in one profile: a second prompt chunk over a past, batch at the limit
    b, top = settings.max_batch, settings.max_seq_len
    step = {"input_ids": (b, 100), "position_ids": (b, 100), "attention_mask": (b, top),
            **{io.past_name.format(i=l, kind=k): (b, io.num_kv_heads, top - 100, io.head_dim)
               for l in range(io.num_layers) for k in ("key", "value")}}
    assert any(all(all(x <= s <= z for x, s, z in zip(parsed["min"][n][p], shape, parsed["max"][n][p])) for n, shape in step.items())
               for p in range(3))


def test_options_equal_the_native_builds_ranges(bundle, tmp_path):
    _, io, settings, opts = ep_options(bundle, tmp_path, max_seq_len=1024)
    native = profiles(settings, io)
    parsed = prov.parse_profile_shapes(opts["trt_profile_max_shapes"])
    assert all(parsed[n][p] == native[p][n][2] for p in range(3) for n in native[p])
    assert settings.max_prompt == 512 and settings.max_seq_len == 1024


def test_without_profiles_no_profile_options(tmp_path):
    opts = prov.trt_ep_options(tmp_path, EngineKey("local", "ep", "0" * 64))
    assert not any(k.startswith("trt_profile") for k in opts)


@pytest.mark.parametrize("bad", ["input_ids", ":1x2", "input_ids:1xa"])
def test_parse_profile_shapes_refuses_garbage(bad):
    with pytest.raises(ConfigError):
        prov.parse_profile_shapes(bad)


@pytest.mark.parametrize("provider", ["cuda", "tensorrt-ep"])
def test_gpu_provider_without_fp16_graph_is_an_error(bundle, monkeypatch, provider):
    """Regression: a GPU provider silently ran the fp32 graph."""
    manifest = loader.open_bundle(bundle, RuntimeOptions())
    assert "fp16" not in manifest["graphs"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [prov.TRT_EP, prov.CUDA_EP, prov.CPU_EP])
    with pytest.raises(ConfigError, match="no fp16 graph, which the GPU providers run"):
        loader.make_backend(bundle, manifest, RuntimeOptions(provider=provider))
