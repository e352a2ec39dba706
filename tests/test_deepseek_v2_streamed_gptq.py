"""DeepSeek-V2 / V3 by GPTQ one decoder layer at a time (deepseek_v2_streamed.gptq_layers, the path above
deepseek_v2.WHOLE_MODEL_PARAMS, forced here by lowering the limit): the same per-layer step on the same
calibration as the whole-model GPTQ path (deepseek_v2_gptq.gptq_mla) gives its weights file byte for
byte and its report's GPTQ section, round-to-nearest fallbacks counted; a run killed after a layer
goes on from the work directory with the same bytes; a lost activations file redoes the layers before;
the routed experts' subsets cut into pieces (the Hessian budget) give the same bytes."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("gptqmodel")

import edge_sdk  # noqa: E402
from test_deepseek_v2_streamed import convert as streamed_convert, manifest  # noqa: E402,F401

CONVERT = dict(method="gptq", nsamples=2, seqlen=64, eval_tokens=128, progress=False)


def convert(model_dir, out, streamed: bool, **over):
    return streamed_convert(model_dir, out, streamed, **(CONVERT | over))


@pytest.fixture(scope="module")
def v2_dir(tiny_model_dir):
    return tiny_model_dir("deepseek_v2")


@pytest.fixture(scope="module")
def v2_whole(v2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dsv2sg-whole") / "b"
    return out, convert(v2_dir, out, False)


@pytest.fixture(scope="module")
def v3_starved_dir(tmp_path_factory):
    """Tiny DeepSeek-V3 whose routed expert 3 is never chosen (correction bias -1e4), nor, with it, expert 2
    (noaux_tc ranks a group by the sum of its best two): 2 x 3 linears x 2 MoE layers round-to-nearest."""
    from safetensors.torch import load_file, save_file

    from edge_sdk.converters.tiny import build_model_dir

    d = build_model_dir(tmp_path_factory.mktemp("dsv3sg") / "m", "deepseek_v3", seed=0)
    w = load_file(d / "model.safetensors")
    for i in (1, 2):
        w[f"model.layers.{i}.mlp.gate.e_score_correction_bias"][3] = -1e4
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_streamed_gptq_bundle_equals_whole_model_gptq_bundle(v2_dir, v2_whole, tmp_path):
    whole, s_whole = v2_whole
    streamed = tmp_path / "streamed"
    s_streamed = convert(v2_dir, streamed, True)
    assert sorted(s_streamed["layer_seconds"]) == [0, 1, 2] and "layer_seconds" not in s_whole
    for f in ("model.weights", "model.onnx"):
        assert (whole / f).read_bytes() == (streamed / f).read_bytes(), f
    mw, ms = manifest(whole), manifest(streamed)
    assert mw["weights"] == ms["weights"] and mw["quantization"] == ms["quantization"]
    assert ms["quantization"]["method"] == "gptq" and ms["quantization"]["engine"].startswith("gptqmodel")
    g = ms["accuracy"]["gptq"]
    assert g == mw["accuracy"]["gptq"]
    assert g["gptq_routed_experts"] == 8 and g["rtn_fallback_experts"] == 0 and g["rtn_fallback_modules"] == []
    assert all(sum(c) == 2 * 2 * 64 for c in g["expert_tokens"].values())  # top-2 x windows x tokens
    for k in ("ppl_float", "ppl_quant", "top1_agreement"):
        assert ms["accuracy"][k] == pytest.approx(mw["accuracy"][k], rel=1e-5), k
    check = ms["accuracy"]["onnx_vs_torch"]
    assert check["per_piece"] and check["greedy_tokens_equal"] and check["max_abs_logit_diff"] < 1e-3


def test_streamed_gptq_counts_round_to_nearest_experts_as_the_whole_model_path(v3_starved_dir, tmp_path):
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    convert(v3_starved_dir, whole, False, verify=False)
    s = convert(v3_starved_dir, streamed, True, verify=False)
    assert (whole / "model.weights").read_bytes() == (streamed / "model.weights").read_bytes()
    g = s["accuracy"]["gptq"]
    assert g == manifest(whole)["accuracy"]["gptq"] == manifest(streamed)["accuracy"]["gptq"]
    assert g["rtn_fallback_experts"] == 4 and g["gptq_routed_experts"] == 2 * 8 - 4
    assert g["rtn_fallback_modules"] == [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in (1, 2)  # in the subsets' order
                                         for e, p in ((2, "gate_proj"), (2, "up_proj"), (3, "gate_proj"), (3, "up_proj"),
                                                      (2, "down_proj"), (3, "down_proj"))]
    for c in g["expert_tokens"].values():
        assert c[2:4] == [0, 0] and min(c[:2] + c[4:]) > 0


def test_expert_subsets_cut_into_pieces_give_the_same_bytes(v2_dir, v2_whole, tmp_path, monkeypatch):
    """With a Hessian budget below one linear's, every expert's gate/up and down run as pieces of their own."""
    from edge_sdk.converters import deepseek_v2_gptq
    from edge_sdk.modelspec import shape_from_config

    monkeypatch.setattr(deepseek_v2_gptq, "HESSIAN_BYTES", 1)
    s = shape_from_config(json.loads((v2_dir / "config.json").read_text()))
    assert len(deepseek_v2_gptq.subsets(s, 1)) == 2 + 5 + 5  # attention 2, then 4 routed + 1 shared, twice
    assert len(deepseek_v2_gptq.subsets(s, 0)) == 4
    convert(v2_dir, tmp_path / "b", True, verify=False)
    assert (tmp_path / "b" / "model.weights").read_bytes() == (v2_whole[0] / "model.weights").read_bytes()
    assert manifest(tmp_path / "b")["accuracy"]["gptq"] == manifest(v2_whole[0])["accuracy"]["gptq"]


KILLED = """
import json, sys
from edge_sdk.converters import deepseek_v2
deepseek_v2.WHOLE_MODEL_PARAMS = 0
import edge_sdk
s = edge_sdk.convert(sys.argv[1], sys.argv[2], work_dir=sys.argv[3], verify=False, **json.loads(sys.argv[4]))
print(sorted(s["layer_seconds"]))
"""


def test_kill_9_after_a_layer_then_the_same_call_gives_the_whole_model_bytes(v2_dir, v2_whole, tmp_path):
    import os
    import subprocess
    import sys

    out, work = tmp_path / "b", tmp_path / "w"
    cmd = [sys.executable, "-c", KILLED, str(v2_dir), str(out), str(work), json.dumps(CONVERT)]
    env = os.environ | {"EDGE_SDK_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(cmd, env=env | {"EDGE_SDK_CONVERT_KILL_AFTER_LAYER": "1"}, capture_output=True, text=True)
    assert r.returncode == -9 and not out.exists()
    # layer 1's integers and its output activations (layer 2's inputs); layer 0's activations dropped
    assert sorted(p.name for p in work.glob("*.safetensors")) == ["acts-0001.safetensors", "layer-0000.safetensors",
                                                                  "layer-0001.safetensors"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[2]"  # layers 0 and 1 came from the work directory
    assert (out / "model.weights").read_bytes() == (v2_whole[0] / "model.weights").read_bytes()
    assert manifest(out)["accuracy"]["gptq"] == manifest(v2_whole[0])["accuracy"]["gptq"]  # read back from layer results


def test_lost_activations_redo_the_layers_before_with_the_same_bytes(v2_dir, v2_whole, tmp_path, monkeypatch):
    from edge_sdk.converters import deepseek_v2_streamed

    class Killed(Exception):
        pass

    def kill_after_0(i):
        if i == 0:
            raise Killed

    work = tmp_path / "w"
    monkeypatch.setattr(deepseek_v2_streamed, "maybe_kill", kill_after_0)
    with pytest.raises(Killed):
        convert(v2_dir, tmp_path / "a", True, work_dir=str(work), verify=False)
    (work / "acts-0000.safetensors").write_bytes(b"torn")  # fails its sha256: removed, layer 0 redone
    monkeypatch.undo()
    s = convert(v2_dir, tmp_path / "b", True, work_dir=str(work), verify=False)
    assert sorted(s["layer_seconds"]) == [0, 1, 2]
    assert (tmp_path / "b" / "model.weights").read_bytes() == (v2_whole[0] / "model.weights").read_bytes()
