"""DeepSeek-V2 converted one decoder layer at a time (converters/deepseek_v2_streamed.py, the path above
deepseek_v2.WHOLE_MODEL_PARAMS, forced here by lowering the limit) writes the bytes of the
whole-model path; its per-piece graph check and streamed accuracy give the whole-model numbers;
a kept work directory is reused."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")

import edge_sdk  # noqa: E402

CONVERT = dict(method="rtn", nsamples=4, seqlen=64, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from edge_sdk.converters.tiny import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("dsv2s") / "model", "deepseek_v2", seed=0)


def convert(model_dir, out, streamed: bool, **over):
    from edge_sdk.converters import deepseek_v2

    with pytest.MonkeyPatch.context() as mp:
        if streamed:
            mp.setattr(deepseek_v2, "WHOLE_MODEL_PARAMS", 0)
        else:  # a streamed run would raise here
            from edge_sdk.converters import deepseek_v2_streamed

            mp.setattr(deepseek_v2_streamed, "run", None)
        return edge_sdk.convert(model_dir, out, **(CONVERT | over))


def manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.mark.parametrize("lm_head", ["int4", "fp16"])
def test_streamed_bundle_equals_whole_model_bundle(model_dir, tmp_path, lm_head):
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    s_whole = convert(model_dir, whole, False, lm_head_dtype=lm_head)
    s_streamed = convert(model_dir, streamed, True, lm_head_dtype=lm_head)
    assert "layer_seconds" in s_streamed and "layer_seconds" not in s_whole
    for f in ("model.weights", "model.onnx", "tokenizer.json"):
        assert (whole / f).read_bytes() == (streamed / f).read_bytes(), f
    mw, ms = manifest(whole), manifest(streamed)
    assert mw["weights"] == ms["weights"] and mw["graphs"] == ms["graphs"] and mw["io"] == ms["io"]
    assert mw["architecture"] == ms["architecture"] and mw["quantization"] == ms["quantization"]
    # the streamed float / int4 models compute what the whole ones do
    aw, as_ = mw["accuracy"], ms["accuracy"]
    for k in ("ppl_float", "ppl_quant", "top1_agreement"):
        assert as_[k] == pytest.approx(aw[k], rel=1e-5), k
    # the graph checked piece by piece (head, 3 layers, tail), within the whole-graph check's tolerance
    check = as_["onnx_vs_torch"]
    assert check["per_piece"] and check["pieces"] == 5 and check["greedy_tokens_equal"]
    assert check["max_abs_logit_diff"] < 1e-3 and check["max_abs_layer_diff"] < 1e-3


def test_kept_work_directory_is_reused(model_dir, tmp_path):
    work = tmp_path / "work"
    first = convert(model_dir, tmp_path / "a", True, work_dir=str(work), keep_work=True)
    assert sorted(first["layer_seconds"]) == [0, 1, 2]
    assert len(list(work.glob("layer-*.safetensors"))) == 3
    second = convert(model_dir, tmp_path / "b", True, work_dir=str(work), verify=False)
    assert second["layer_seconds"] == {}  # every layer read back from the work directory
    assert (tmp_path / "a" / "model.weights").read_bytes() == (tmp_path / "b" / "model.weights").read_bytes()
    assert not any(work.glob("layer-*"))  # removed once the bundle is written


KILLED = """
import sys
from edge_sdk.converters import deepseek_v2
deepseek_v2.WHOLE_MODEL_PARAMS = 0
import edge_sdk
s = edge_sdk.convert(sys.argv[1], sys.argv[2], work_dir=sys.argv[3], method="rtn", nsamples=4, seqlen=64, progress=False)
print(sorted(s["layer_seconds"]))
"""


def test_kill_9_after_a_layer_then_the_same_call_gives_the_whole_model_bytes(model_dir, tmp_path):
    import os
    import subprocess
    import sys

    out, work = tmp_path / "b", tmp_path / "w"
    cmd = [sys.executable, "-c", KILLED, str(model_dir), str(out), str(work)]
    env = os.environ | {"EDGE_SDK_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(cmd, env=env | {"EDGE_SDK_CONVERT_KILL_AFTER_LAYER": "1"}, capture_output=True, text=True)
    assert r.returncode == -9 and not out.exists()
    assert sorted(p.name for p in work.glob("layer-*.safetensors")) == ["layer-0000.safetensors", "layer-0001.safetensors"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[2]"  # layers 0 and 1 came from the work directory
    convert(model_dir, tmp_path / "whole", False)
    assert (out / "model.weights").read_bytes() == (tmp_path / "whole" / "model.weights").read_bytes()
