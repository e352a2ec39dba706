"""DeepSeek-V2 by GPTQ (deepseek_v2_gptq): a tiny random checkpoint converts; the runtime's greedy tokens
equal transformers holding the bundle's own dequantized weights; on the calibration activations GPTQ's
layer-output error is below round-to-nearest's for the attention projections and the routed experts;
each expert's token count equals a hand count from transformers' router; an expert the router never
picks is round-to-nearest and counted; the weight bytes equal the planner's."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("gptqmodel")

import edge_sdk  # noqa: E402
from test_deepseek_v2 import NEW, PROMPTS, reference_model, runtime_greedy, torch_greedy  # noqa: E402

CONVERT = dict(method="gptq", nsamples=4, seqlen=64, progress=False)
ATTN = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def convert_spying(model_dir, out):
    """Converts by GPTQ and keeps the calibration windows GPTQ saw."""
    from edge_sdk.converters import deepseek_v2_gptq as g

    seen, real = {}, g.gptq_mla

    def spy(weights, s, cfg, routing, calib, opts):
        seen["ids"] = calib.ids
        return real(weights, s, cfg, routing, calib, opts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(g, "gptq_mla", spy)
        summary = edge_sdk.convert(model_dir, out, **CONVERT)
    return summary, seen["ids"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("deepseek_v2")


@pytest.fixture(scope="module")
def converted(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dsv2g-bundle") / "b"
    summary, ids = convert_spying(model_dir, out)
    return out, summary, ids


@pytest.fixture(scope="module")
def bundle(converted):
    return converted[0]


def manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_manifest_says_gptq_router_fp16(bundle):
    m = manifest(bundle)
    assert m["quantization"]["method"] == "gptq" and m["quantization"]["engine"].startswith("gptqmodel")
    assert m["quantization"]["router_dtype"] == "fp16"
    assert m["weights"]["tensors"]["model.layers.1.mlp.gate.weight"]["dtype"] == "float16"
    assert m["accuracy"]["gptq"]["rtn_fallback_experts"] == 0 and m["accuracy"]["gptq"]["gptq_routed_experts"] == 8


def test_weight_bytes_equal_the_planner(bundle):
    from edge_sdk.modelspec import shape_from_config
    from edge_sdk.planner import QuantSpec, weight_bytes

    m = manifest(bundle)
    stored = sum(t["nbytes"] for t in m["weights"]["tensors"].values())
    assert stored == weight_bytes(shape_from_config(m["source"]["config"]), QuantSpec()).total == edge_sdk.plan(bundle).weight_bytes["total"]


@pytest.fixture(scope="module")
def pair(model_dir, bundle):
    return edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1), reference_model(model_dir, bundle)


# the greedy checks of test_deepseek_v2, run here on this module's `pair`
from test_deepseek_v2 import test_greedy_batch1_equals_torch, test_greedy_batch2_left_padded_equals_torch  # noqa: E402,F401


# ---- what GPTQ saw, recomputed with transformers --------------------------------------------------------

@pytest.fixture(scope="module")
def seen(model_dir, pair, converted):
    """transformers' float model with every int4 linear replaced by the bundle's (embeddings, norms and
    router float, as in GPTQ's replay), run over the calibration windows: each attention projection's
    inputs, each MoE layer's router input and top-k choice."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    q_state, state = pair[1].state_dict(), hf.state_dict()
    for k in state:
        if k.endswith(("_proj.weight", "_mqa.weight", "experts.gate_up_proj", "experts.down_proj")) and not k.startswith("lm_head"):
            state[k].copy_(q_state[k])
    acts, hooks = {}, []
    for i, layer in enumerate(hf.model.layers):
        for n in ATTN:
            hooks.append(getattr(layer.self_attn, n).register_forward_hook(
                lambda m, a, o, key=f"model.layers.{i}.self_attn.{n}": acts.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))))
        if hasattr(layer.mlp, "experts"):
            hooks.append(layer.mlp.experts.register_forward_pre_hook(
                lambda m, a, key=f"model.layers.{i}.mlp.experts": acts.setdefault(key, []).append((a[0], a[1]))))
    with torch.no_grad():
        for ids in converted[2]:
            hf(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return acts, hf


def test_expert_token_counts_equal_a_hand_count_from_the_router(seen, bundle):
    import torch

    acts, _ = seen
    counts = manifest(bundle)["accuracy"]["gptq"]["expert_tokens"]
    assert sorted(counts) == ["1", "2"]
    for i, got in counts.items():
        idx = torch.cat([top_k for _, top_k in acts[f"model.layers.{i}.mlp.experts"]])  # [N, k]
        assert got == torch.bincount(idx.flatten(), minlength=4).tolist()
        assert sum(got) == 2 * 4 * 64  # k x windows x tokens


def _err(x, w_q, w):
    return float(((x @ (w_q - w).T) ** 2).sum())


def test_gptq_output_error_below_rtn(model_dir, seen):
    """Sum over modules of |X (Wq - W)^T|^2 on each module's calibration inputs: GPTQ's integers against
    round-to-nearest's, for the attention projections and for the routed experts (every one got tokens)."""
    import torch
    from safetensors.torch import load_file

    from edge_sdk.converters.quant import rtn

    acts, hf = seen
    float_w = {k: v.float() for k, v in load_file(model_dir / "model.safetensors").items()}
    state = hf.state_dict()

    def rtn_w(w):
        return rtn(w, 128).dequantize()

    attn = {"gptq": 0.0, "rtn": 0.0}
    for key, xs in ((k, v) for k, v in acts.items() if ".self_attn." in k):
        x, w = torch.cat(xs), float_w[f"{key}.weight"]
        attn["gptq"] += _err(x, state[f"{key}.weight"], w)
        attn["rtn"] += _err(x, rtn_w(w), w)
    experts = {"gptq": 0.0, "rtn": 0.0}
    inter = 128
    for key, pairs in ((k, v) for k, v in acts.items() if k.endswith(".mlp.experts")):
        hidden, idx = torch.cat([h for h, _ in pairs]), torch.cat([t for _, t in pairs])
        for e in range(4):
            x = hidden[(idx == e).any(-1)]
            assert x.shape[0] > 0
            gu = state[f"{key}.gate_up_proj"][e]
            g_q, u_q, d_q = gu[:inter], gu[inter:], state[f"{key}.down_proj"][e]
            g, u, d = (float_w[f"{key}.{e}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
            x_down = torch.nn.functional.silu(x @ g_q.T) * (x @ u_q.T)  # down_proj's input after gate/up are quantized
            experts["gptq"] += _err(x, g_q, g) + _err(x, u_q, u) + _err(x_down, d_q, d)
            experts["rtn"] += _err(x, rtn_w(g), g) + _err(x, rtn_w(u), u) + _err(x_down, rtn_w(d), d)
    # measured: attention 0.31, experts 0.13 of round-to-nearest's error
    assert attn["gptq"] < 0.4 * attn["rtn"], attn
    assert experts["gptq"] < 0.2 * experts["rtn"], experts


# ---- an expert without calibration tokens ------------------------------------------------------------

def test_expert_without_tokens_is_round_to_nearest_and_counted(tmp_path):
    """DeepSeek-V3 routing: a correction bias of -1e4 keeps routed expert 3 out of every token's top-k, and
    its group (experts 2 and 3; noaux_tc ranks a group by the sum of its best two) out of every kept pair."""
    import torch
    from safetensors.torch import load_file, save_file

    from edge_sdk.converters.quant import rtn
    from edge_sdk.converters.tiny import build_model_dir

    d = build_model_dir(tmp_path / "m", "deepseek_v3", seed=0)
    w = load_file(d / "model.safetensors")
    for i in (1, 2):
        w[f"model.layers.{i}.mlp.gate.e_score_correction_bias"][3] = -1e4
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    summary, _ = convert_spying(d, tmp_path / "b")
    g = summary["accuracy"]["gptq"]
    assert g["rtn_fallback_experts"] == 4 and g["gptq_routed_experts"] == 2 * 8 - 4
    for c in g["expert_tokens"].values():
        assert c[2:4] == [0, 0] and min(c[:2] + c[4:]) > 0 and sum(c) == 2 * 4 * 64
    assert sorted(g["rtn_fallback_modules"]) == sorted(f"model.layers.{i}.mlp.experts.{e}.{p}" for i in (1, 2)
                                                       for p in ("gate_proj", "up_proj", "down_proj") for e in (2, 3))
    # the stored experts 2 and 3 are round-to-nearest of the float weights, byte for byte
    from test_deepseek_v2 import stacked_experts

    got = stacked_experts(tmp_path / "b" / "model.onnx")
    for i in (1, 2):
        for p in ("gate_proj", "up_proj", "down_proj"):
            for e in (2, 3):
                want = rtn(w[f"model.layers.{i}.mlp.experts.{e}.{p}.weight"].float(), 128).dequantize().numpy()
                np.testing.assert_array_equal(got[f"model.layers.{i}.mlp.experts.{e}.{p}.qweight"].T, want)
    assert summary["quantization"]["method"] == "gptq" and torch.isfinite(torch.tensor(summary["accuracy"]["ppl_quant"]))


def test_cli_summary_says_how_many_experts_are_round_to_nearest(converted, model_dir, tmp_path, monkeypatch, capsys):
    from edge_sdk.cli.main import main

    summary = converted[1]
    monkeypatch.setattr(edge_sdk, "convert", lambda *a, **k: summary | {"accuracy": summary["accuracy"] | {
        "gptq": summary["accuracy"]["gptq"] | {"gptq_routed_experts": 6, "rtn_fallback_experts": 2}}})
    assert main(["convert", str(model_dir), "-o", str(tmp_path / "out")]) == 0
    assert "experts       6 routed experts by GPTQ, 2 round-to-nearest" in capsys.readouterr().out
