"""DeepSeek-V2 (MLA + fine-grained MoE): a tiny random checkpoint converted by round-to-nearest; the
runtime's greedy tokens equal transformers' DeepseekV2ForCausalLM holding the bundle's own dequantized
weights; the bundle's weight bytes and cache size equal the planner's; bad configs are refused first."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

import edge_sdk  # noqa: E402
from edge_sdk.errors import ConfigError, ConversionError  # noqa: E402
from edge_sdk.modelspec import shape_from_config  # noqa: E402
from test_generation_e2e import runtime_greedy, torch_greedy  # noqa: E402,F401 (test_deepseek_v2_gptq imports them from here)

PROMPTS = [[7], [5, 17, 42, 7, 99, 3, 64]]
NEW = 8
CONVERT = dict(method="rtn", nsamples=4, seqlen=64, progress=False)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("deepseek_v2")


@pytest.fixture(scope="module")
def bundle(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dsv2-bundle") / "b"
    edge_sdk.convert(model_dir, out, **CONVERT)
    return out


def manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


# ---- refusals, before any heavy work ------------------------------------------------------------

def tiny_cfg(**over):
    from edge_sdk.converters.tiny import tiny_config

    return tiny_config("deepseek_v2", 1024, **over)


@pytest.mark.parametrize("over, words", [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 must be between 1 and n_routed_experts 4"),
    ({"qk_head_dim": 48}, "qk_head_dim 48 is not qk_nope_head_dim + qk_rope_head_dim = 64"),
    ({"head_dim": 64}, "head_dim 64 is not qk_rope_head_dim 32"),
    ({"qk_rope_head_dim": 31}, "qk_rope_head_dim 31 is odd"),
    ({"q_lora_rank": 0}, "'q_lora_rank' must be null or a positive integer"),
])
def test_inconsistent_dims_refused_by_shape(over, words):
    with pytest.raises(ConfigError, match=words.replace("+", r"\+")):
        shape_from_config(tiny_cfg(**over))


@pytest.mark.parametrize("over, words", [
    ({"topk_method": "noaux_tc"}, "routing topk_method 'noaux_tc' is not supported"),
    ({"scoring_func": "sigmoid"}, "routing scoring_func 'sigmoid' is not supported"),
    ({"norm_topk_prob": True}, "norm_topk_prob true is not supported"),
    ({"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1}, "group-limited routing with n_group 3"),
    ({"moe_layer_freq": 2}, "moe_layer_freq 2 is not supported"),
])
def test_unsupported_routing_refused(over, words):
    from edge_sdk.converters.deepseek_v2 import check_config

    cfg = tiny_cfg(**over)
    with pytest.raises(ConfigError, match=words):
        check_config(cfg, shape_from_config(cfg))


def test_group_limited_routing_accepted():
    from edge_sdk.converters.deepseek_v2 import check_config

    cfg = tiny_cfg(topk_method="group_limited_greedy", n_group=2, topk_group=1)
    assert check_config(cfg, shape_from_config(cfg))["topk_method"] == "group_limited_greedy"


def test_missing_expert_refused_before_quantizing(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    w = load_file(d / "model.safetensors")
    for p in ("gate_proj", "up_proj", "down_proj"):
        del w[f"model.layers.2.mlp.experts.3.{p}.weight"]
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"3 weights of routed expert\(s\) 3 missing"):
        edge_sdk.convert(d, tmp_path / "out", **CONVERT)
    assert not (tmp_path / "out").exists()


# ---- the bundle ------------------------------------------------------------------------------------

def test_every_projection_and_expert_int4_router_fp16(bundle):
    t = manifest(bundle)["weights"]["tensors"]
    cfg = tiny_cfg()
    for i in range(3):
        p = f"model.layers.{i}"
        attn = [f"{p}.self_attn.{n}" for n in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
        mlp = [f"{p}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")] if i == 0 else \
            [f"{p}.mlp.shared_experts.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
        for m in attn + mlp:
            assert t[f"{m}.qweight"]["dtype"] == "int4" and t[f"{m}.scales"]["dtype"] == "float16", m
        if i:
            assert t[f"{p}.mlp.gate.weight"] == t[f"{p}.mlp.gate.weight"] | {"dtype": "float16", "shape": [cfg["hidden_size"], 4]}
            # routed experts stacked as QMoE reads them: uint4 bytes [E, out, in / 2], scales [E, out, in / g]
            h, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
            for m, shape in (("gate_up_proj", [4, 2 * inter, h]), ("down_proj", [4, h, inter])):
                q, sc = t[f"{p}.mlp.experts.{m}.qweight"], t[f"{p}.mlp.experts.{m}.scales"]
                assert (q["dtype"], q["shape"]) == ("uint8", [*shape[:2], shape[2] // 2])
                assert (sc["dtype"], sc["shape"]) == ("float16", [*shape[:2], shape[2] // 128])
            assert not any(".mlp.experts.0." in n for n in t)


def test_moe_layers_are_qmoe_nodes_reading_the_stored_experts(bundle):
    m = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    nodes = [n for n in m.graph.node if n.op_type == "QMoE"]
    assert [n.domain for n in nodes] == ["com.microsoft"] * 2
    for i, n in zip((1, 2), nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs | {"k": 2, "block_size": 128, "expert_weight_bits": 4, "swiglu_fusion": 1, "normalize_routing_weights": 0} == attrs
        assert n.input[2] == f"model.layers.{i}.mlp.experts.gate_up_proj.qweight"
        assert n.input[5] == f"model.layers.{i}.mlp.experts.down_proj.qweight"
        assert n.input[1] == n.input[14]  # the router's weights select and mix
    assert not any(n.op_type == "DequantizeLinear" and ".experts." in n.input[0] for n in m.graph.node)


def test_bytes_a_token_reads_equal_the_planners(bundle):
    """Every tensor once, the routed experts k / E of them (QMoE reads a token's top-k), one embedding row."""
    from edge_sdk.planner import QuantSpec, weight_bytes

    t = manifest(bundle)["weights"]["tensors"]
    shape = shape_from_config(manifest(bundle)["source"]["config"])
    routed = sum(v["nbytes"] for n, v in t.items() if ".mlp.experts." in n)
    embed = t["model.embed_tokens.weight"]["nbytes"]
    read = sum(v["nbytes"] for v in t.values()) - embed - routed + routed * 2 // 4 + embed // shape.vocab_size
    assert read == weight_bytes(shape, QuantSpec()).read_per_token


def test_weight_bytes_and_cache_equal_the_planner(bundle):
    from edge_sdk.modelspec import shape_from_config
    from edge_sdk.planner import QuantSpec, weight_bytes

    m = manifest(bundle)
    shape = shape_from_config(m["source"]["config"])
    stored = sum(t["nbytes"] for t in m["weights"]["tensors"].values())
    assert stored == weight_bytes(shape, QuantSpec()).total == edge_sdk.plan(bundle).weight_bytes["total"]
    model = edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1)
    # the runtime's fp32 cache holds exactly the latent + rope key per layer and token
    assert model.backend.io.kv_bytes_per_token() == shape.kv_elements_per_token() * 4
    assert edge_sdk.plan(bundle).kv_bytes_per_token == shape.kv_elements_per_token() * 2  # the planner's fp16 figure


# ---- greedy tokens against transformers ------------------------------------------------------------

def reference_model(model_dir, bundle):
    """transformers' DeepseekV2ForCausalLM with the bundle's dequantized weights (experts stacked as it holds them)."""
    import torch
    from test_generation_e2e import dequantized_initializers
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state = hf.state_dict()
    w = {k.removesuffix(".qweight") + ".weight" if k.endswith(".qweight") else k: torch.from_numpy(np.ascontiguousarray(v))
         for k, v in (dequantized_initializers(bundle / "model.onnx") | stacked_experts(bundle / "model.onnx")).items()}
    loaded = set()
    for name, t in w.items():
        if not name.endswith(".weight"):
            continue  # scales (already applied by the dequantization)
        if name.endswith(("_proj.weight", "_mqa.weight", ".mlp.gate.weight", "lm_head.weight")):
            t = t.T  # stored [in, out] for MatMul; torch holds [out, in]
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, proj = int(rest.split(".")[0]), rest.split(".")[1]
            n_i = t.shape[0] if proj != "down_proj" else None
            if proj == "down_proj":
                key = f"{prefix}.mlp.experts.down_proj"
                state[key][e].copy_(t)
            else:
                key = f"{prefix}.mlp.experts.gate_up_proj"
                rows = slice(0, n_i) if proj == "gate_proj" else slice(n_i, 2 * n_i)
                state[key][e, rows].copy_(t)
            loaded.add(f"{key}.{e}.{proj}")
            continue
        if name in state:
            assert t.shape == state[name].shape, (name, t.shape, state[name].shape)
            state[name].copy_(t)
            loaded.add(name)
    expected = {k for k in state if k.endswith("proj.weight") or k.endswith("mqa.weight")}
    assert expected <= loaded, sorted(expected - loaded)[:3]
    assert sum(".mlp.experts." in k for k in loaded) == 2 * 4 * 3  # 2 MoE layers x 4 experts x 3 projections
    return hf


def stacked_experts(graph_path) -> dict[str, np.ndarray]:
    """Each QMoE node's experts, dequantized from the stored uint4 bytes and fp16 scales by hand:
    {model.layers.i.mlp.experts.e.{gate,up,down}_proj.qweight: [in, out]}."""
    m = onnx.load(str(graph_path), load_external_data=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {}
    for node in (n for n in m.graph.node if n.op_type == "QMoE"):
        g = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "block_size")
        for k in (2, 5):
            b = inits[node.input[k]]  # [E, out, in / 2]
            q = np.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:2], -1).astype(np.float32) - 8
            sc = inits[node.input[k + 1].removesuffix("_fp32")].astype(np.float32)  # [E, out, in / g]
            wt = q * np.repeat(sc, g, axis=2)
            prefix = node.input[k].rsplit(".", 2)[0]  # model.layers.i.mlp.experts
            for e in range(wt.shape[0]):
                parts = {"gate_proj": wt[e, 0::2], "up_proj": wt[e, 1::2]} if k == 2 else {"down_proj": wt[e]}
                out |= {f"{prefix}.{e}.{p}.qweight": v.T for p, v in parts.items()}
    return out


@pytest.fixture(scope="module")
def pair(model_dir, bundle):
    return edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1), reference_model(model_dir, bundle)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["len1", "len7"])
def test_greedy_batch1_equals_torch(pair, prompt):
    model, hf = pair
    assert runtime_greedy(model, [prompt], NEW)[0] == torch_greedy(hf, prompt, NEW)


def test_greedy_batch2_left_padded_equals_torch(pair):
    model, hf = pair
    assert runtime_greedy(model, PROMPTS, NEW) == [torch_greedy(hf, p, NEW) for p in PROMPTS]


def test_prefill_logits_close_to_torch(pair):
    import torch

    model, hf = pair
    logits = model.backend.forward(np.array([PROMPTS[1]]), model.backend.new_cache(1, 16))
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[1]])).logits.numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-3, atol=1e-3)


def test_fused_graph_refused_with_one_line_and_auto_runs_standard(bundle):
    with pytest.raises(ConfigError, match="architecture DeepseekV2ForCausalLM has no fused form"):
        edge_sdk.load(bundle, provider="cpu", graph="fused")
    assert edge_sdk.load(bundle, provider="cpu").backend.describe()["graph_form"] == "standard"
