"""DeepSeek-V3 / R1 routing (sigmoid scores, a correction bias added for selection only, noaux_tc
group-limited top-k, norm_topk_prob, routed_scaling_factor) in the DeepSeek-V2 graph: a tiny
V3-config checkpoint converted by round-to-nearest gives the runtime the greedy tokens of
transformers' DeepseekV3ForCausalLM holding the bundle's own dequantized weights; the bias and the
group limit each change selections on these prompts; bad routing configs are refused first."""

import json
import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

import edge_sdk  # noqa: E402
from edge_sdk.errors import ConfigError, ConversionError  # noqa: E402
from edge_sdk.modelspec import shape_from_config  # noqa: E402
from test_generation_e2e import runtime_greedy, torch_greedy  # noqa: E402

PROMPTS = [[7], [5, 17, 42, 7, 99, 3, 64]]
NEW = 8
CONVERT = dict(method="rtn", nsamples=4, seqlen=64, progress=False)
BIAS = "e_score_correction_bias"
MOE_LAYERS = (1, 2)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("deepseek_v3")


@pytest.fixture(scope="module")
def bundle(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dsv3-bundle") / "b"
    edge_sdk.convert(model_dir, out, **CONVERT)
    return out


def manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def tiny_cfg(arch="deepseek_v3", **over):
    from edge_sdk.converters.tiny import tiny_config

    cfg = tiny_config(arch, 1024, **over)
    return {k: v for k, v in cfg.items() if v is not None}  # None: the key is absent


# ---- refusals, before any heavy work ------------------------------------------------------------

@pytest.mark.parametrize("arch, over, words", [
    ("deepseek_v3", {"topk_method": "greedy"}, "routing topk_method 'greedy' is not supported for DeepseekV3ForCausalLM"),
    ("deepseek_v3", {"topk_method": "top_p"}, "routing topk_method 'top_p' is not supported for DeepseekV3ForCausalLM"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "routing scoring_func 'softmax' is not supported for DeepseekV3ForCausalLM"),
    ("deepseek_v3", {"scoring_func": "tanh"}, "routing scoring_func 'tanh' is not supported"),
    ("deepseek_v3", {"n_group": 3}, "group-limited routing with n_group 3, topk_group 2 does not fit 8 experts"),
    ("deepseek_v3", {"n_group": 8, "topk_group": 4}, "group-limited routing with n_group 8, topk_group 4"),  # groups of 1: no best two
    ("deepseek_v3", {"topk_group": 5}, "group-limited routing with n_group 4, topk_group 5"),
    ("deepseek_v3", {"n_group": "4"}, "routing n_group '4' is not an integer"),
    ("deepseek_v3", {"routed_scaling_factor": "2.5"}, "routing routed_scaling_factor '2.5' is not a number"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave False is not supported for DeepseekV3ForCausalLM"),
    ("deepseek_v3", {"first_k_dense_replace": None}, "first_k_dense_replace is missing for DeepseekV3ForCausalLM"),
    ("deepseek_v2", {"scoring_func": "sigmoid"}, "routing scoring_func 'sigmoid' is not supported for DeepseekV2ForCausalLM"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "routing topk_method 'noaux_tc' is not supported for DeepseekV2ForCausalLM"),
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob true is not supported for DeepseekV2ForCausalLM"),
])
def test_unsupported_routing_refused_with_one_line(arch, over, words):
    from edge_sdk.converters.deepseek_v2 import check_config

    cfg = tiny_cfg(arch, **over)
    with pytest.raises(ConfigError, match=words) as e:
        check_config(cfg, shape_from_config(cfg))
    assert "\n" not in str(e.value)


def test_v3_routing_read_from_config():
    from edge_sdk.converters.deepseek_v2 import check_config

    cfg = tiny_cfg()
    assert check_config(cfg, shape_from_config(cfg)) == {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4,
                                                         "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5}


@pytest.mark.parametrize("arch, hf_config", [("DeepseekV2ForCausalLM", "DeepseekV2Config"), ("DeepseekV3ForCausalLM", "DeepseekV3Config")])
def test_absent_routing_keys_default_as_transformers(arch, hf_config):
    import transformers

    from edge_sdk.converters.deepseek_v2 import ROUTING

    hf = getattr(transformers, hf_config)()
    for key, ours in ROUTING[arch]["defaults"].items():
        theirs = getattr(hf, key, None)
        if theirs is not None:  # V3's class has no topk_method / scoring_func (it computes only noaux_tc sigmoid)
            assert theirs == ours, key


def test_missing_correction_bias_refused_before_quantizing(model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from edge_sdk.converters import deepseek_v2

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    w = load_file(d / "model.safetensors")
    del w[f"model.layers.2.mlp.gate.{BIAS}"]
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(deepseek_v2, "quantize", lambda *a: pytest.fail("quantized before refusing"))
    with pytest.raises(ConversionError, match=f"the router's {BIAS} is missing for layer\\(s\\) 2") as e:
        edge_sdk.convert(d, tmp_path / "out", **CONVERT)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_wrong_shaped_correction_bias_refused_before_quantizing(model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from edge_sdk.converters import deepseek_v2

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    w = load_file(d / "model.safetensors")
    w[f"model.layers.1.mlp.gate.{BIAS}"] = w[f"model.layers.1.mlp.gate.{BIAS}"][:7].clone()
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(deepseek_v2, "quantize", lambda *a: pytest.fail("quantized before refusing"))
    with pytest.raises(ConversionError, match=rf"model.layers.1.mlp.gate.{BIAS} has shape \[7\], not \[8\]"):
        edge_sdk.convert(d, tmp_path / "out", **CONVERT)
    assert not (tmp_path / "out").exists()


# ---- the router against transformers' -----------------------------------------------------------

def hf_router(cfg: dict, weight, bias):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    r = DeepseekV3TopkRouter(DeepseekV3Config(**{k: v for k, v in cfg.items() if k != "architectures"}))
    with torch.no_grad():
        r.weight.copy_(weight)
        r.e_score_correction_bias.copy_(bias)
    return r


def dense(topk_weights, topk_indices, e):
    return torch.zeros(topk_indices.shape[0], e).scatter(-1, topk_indices, topk_weights)


@pytest.mark.parametrize("norm", [True, False])
def test_router_equals_transformers_and_needs_an_fp32_bias(norm):
    """A realistic bias (a large common offset, a small spread): the graph's router equals transformers'
    with the fp32 bias; rounded to fp16 the bias picks other experts for some tokens."""
    from edge_sdk.converters.mla import Router

    cfg = tiny_cfg(norm_topk_prob=norm)
    g = torch.Generator().manual_seed(1)
    weight, x = torch.randn(8, 256, generator=g) * 0.02, torch.randn(512, 256, generator=g)
    bias = 7.0 + torch.randn(8, generator=g) * 0.05
    from edge_sdk.converters.deepseek_v2 import routing

    ours = Router(weight.t().contiguous(), shape_from_config(cfg), routing(cfg), bias)(x[None])[0]
    with torch.no_grad():
        _, w, idx = hf_router(cfg, weight, bias)(x)
        _, _, idx16 = hf_router(cfg, weight, bias.half().float())(x)
    assert torch.equal(ours != 0, dense(w, idx, 8) != 0)
    torch.testing.assert_close(ours, dense(w, idx, 8), rtol=1e-6, atol=1e-7)
    flips = (dense(w, idx16, 8) != 0).ne(ours != 0).any(-1).sum().item()
    assert flips > 0  # measured: 4 of 512 tokens with seed 1


# ---- the bundle ------------------------------------------------------------------------------------

def test_bias_stored_fp32_exactly_and_routing_in_manifest(bundle, model_dir):
    from safetensors.torch import load_file

    m, src = manifest(bundle), load_file(model_dir / "model.safetensors")
    t = m["weights"]["tensors"]
    raw = (bundle / "model.weights").read_bytes()
    for i in MOE_LAYERS:
        name = f"model.layers.{i}.mlp.gate.{BIAS}"
        meta = t[name]
        assert meta["dtype"] == "float32" and meta["shape"] == [8]
        stored = np.frombuffer(raw, np.float32, count=8, offset=meta["offset"])
        np.testing.assert_array_equal(stored, src[name].numpy())
        assert t[f"model.layers.{i}.mlp.gate.weight"]["dtype"] == "float16"
    assert f"model.layers.0.mlp.gate.{BIAS}" not in t  # first_k_dense_replace 1: layer 0 is dense
    assert m["architecture"]["moe"]["routing"] == {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4,
                                                   "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5}
    assert m["quantization"]["router_dtype"] == "fp16" and m["quantization"]["router_bias_dtype"] == "fp32"


def test_weight_bytes_equal_the_planner(bundle):
    from edge_sdk.planner import QuantSpec, weight_bytes

    m = manifest(bundle)
    shape = shape_from_config(m["source"]["config"])
    stored = sum(t["nbytes"] for t in m["weights"]["tensors"].values())
    assert stored == weight_bytes(shape, QuantSpec()).total == edge_sdk.plan(bundle).weight_bytes["total"]


# ---- greedy tokens against transformers ------------------------------------------------------------

def bundle_weights(bundle) -> dict:
    """{checkpoint name: fp32 tensor [out, in] as torch holds it} of everything the bundle's graph reads;
    routed experts as transformers stacks them (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I])."""
    from test_generation_e2e import _through_casts, dequantized_initializers

    graph = bundle / "model.onnx"
    out = {}
    for k, v in dequantized_initializers(graph).items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if k.endswith(".qweight"):
            k = k.removesuffix(".qweight") + ".weight"
        if k.endswith(("_proj.weight", "_mqa.weight", ".mlp.gate.weight", "lm_head.weight")):
            t = t.T  # stored [in, out] for MatMul
        out[k] = t
    m = onnx.load(str(graph), load_external_data=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "QMoE":
            block = next(a.i for a in node.attribute if a.name == "block_size")
            gate_up, down = (qmoe_dequantized(inits[node.input[k]], _through_casts(m, node.input[k + 1], inits), block) for k in (2, 5))
            prefix = node.input[2].removesuffix(".gate_up_proj.qweight")
            out[f"{prefix}.gate_up_proj"] = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)  # interleaved -> [gate; up]
            out[f"{prefix}.down_proj"] = down
    for name in [k for k in out if ".mlp.experts." in k and k.endswith(".weight")]:  # experts stored one by one
        prefix, rest = name.split(".mlp.experts.")
        e, proj = int(rest.split(".")[0]), rest.split(".")[1]
        if proj == "down_proj":
            out.setdefault(f"{prefix}.mlp.experts.down_proj", {})[e] = out.pop(name)
        else:
            out.setdefault(f"{prefix}.mlp.experts.gate_up_proj.{proj}", {})[e] = out.pop(name)
    for key in [k for k in out if isinstance(out[k], dict) and k.endswith("down_proj")]:
        out[key] = torch.stack([out[key][e] for e in sorted(out[key])])
    for key in [k for k in out if k.endswith(".gate_up_proj.gate_proj")]:
        p = key.removesuffix(".gate_proj")
        g, u = out.pop(key), out.pop(f"{p}.up_proj")
        out[p] = torch.stack([torch.cat([g[e], u[e]]) for e in sorted(g)])
    return out


def qmoe_dequantized(q: np.ndarray, scales: np.ndarray, block: int) -> torch.Tensor:
    """QMoE's uint4 experts [E, out, in / 2] (low nibble first, zero point 8) and scales [E, out, in / block] -> [E, out, in]."""
    low, high = (q & 0x0F).astype(np.float32), (q >> 4).astype(np.float32)
    values = np.stack([low, high], axis=-1).reshape(*q.shape[:2], -1) - 8.0
    return torch.from_numpy(values * np.repeat(scales.astype(np.float32), block, axis=-1))


def reference_model(model_dir, bundle):
    """transformers' DeepseekV3ForCausalLM holding the bundle's dequantized weights (and its fp32 bias)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state = hf.state_dict()
    w = bundle_weights(bundle)
    for name, t in w.items():
        if name in state:
            assert t.shape == state[name].shape, (name, t.shape, state[name].shape)
            state[name].copy_(t)
    linears = {k for k in state if k.endswith(("proj.weight", "mqa.weight", "experts.gate_up_proj", "experts.down_proj", ".mlp.gate.weight"))}
    assert linears | {k for k in state if k.endswith(BIAS)} <= set(w), sorted(linears - set(w))[:3]
    assert hf.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    return hf


@pytest.fixture(scope="module")
def pair(model_dir, bundle):
    return edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1), reference_model(model_dir, bundle)


# the greedy checks of test_deepseek_v2, run here on this module's `pair`
from test_deepseek_v2 import test_greedy_batch1_equals_torch, test_greedy_batch2_left_padded_equals_torch  # noqa: E402,F401


def gate_inputs(hf, ids) -> dict[int, torch.Tensor]:
    """{MoE layer: the router's input [T, hidden]} for one forward pass over ids."""
    seen, hooks = {}, []
    for i in MOE_LAYERS:
        hooks.append(hf.model.layers[i].mlp.gate.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        hf(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return seen


def selections(gate, x, **change) -> torch.Tensor:
    """Each token's chosen experts [T, k] (sorted) with the gate's settings changed as given."""
    saved = {k: getattr(gate, k) for k in change}
    for k, v in change.items():
        setattr(gate, k, v)
    try:
        with torch.no_grad():
            return gate(x)[2].sort(-1).values
    finally:
        for k, v in saved.items():
            setattr(gate, k, v)


def test_bias_and_group_limit_each_change_selections(pair):
    """On the test's own prompts, ignoring the correction bias, or keeping every group, routes at least
    one token of some layer elsewhere: the greedy comparisons above exercise both."""
    model, hf = pair
    ids = PROMPTS[1] + torch_greedy(hf, PROMPTS[1], NEW)
    bias_changes = groups_change = 0
    for i, x in gate_inputs(hf, ids).items():
        gate = hf.model.layers[i].mlp.gate
        as_configured = selections(gate, x)
        bias_changes += (selections(gate, x, e_score_correction_bias=torch.zeros(8)) != as_configured).any(-1).sum().item()
        groups_change += (selections(gate, x, topk_group=gate.num_group) != as_configured).any(-1).sum().item()
    assert bias_changes > 0 and groups_change > 0, (bias_changes, groups_change)


def test_prefill_logits_close_to_torch_and_far_from_a_biasless_router(pair):
    model, hf = pair
    logits = model.backend.forward(np.array([PROMPTS[1]]), model.backend.new_cache(1, 16))
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[1]])).logits.numpy()
        biases = [hf.model.layers[i].mlp.gate.e_score_correction_bias for i in MOE_LAYERS]
        saved = [b.clone() for b in biases]
        for b in biases:
            b.zero_()
        try:
            biasless = hf(torch.tensor([PROMPTS[1]])).logits.numpy()
        finally:
            for b, s in zip(biases, saved):
                b.copy_(s)
    np.testing.assert_allclose(logits, ref, rtol=1e-3, atol=1e-3)
    assert np.abs(logits - biasless).max() > 1e-2  # the graph's routing uses the bias


# ---- any routing values: accepted or refused with one line ----------------------------------------

def test_any_routing_values_are_accepted_or_refused_with_one_line():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from edge_sdk.converters.deepseek_v2 import ROUTING, check_config

    value = st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(allow_nan=True, allow_infinity=True),
                      st.sampled_from(["noaux_tc", "sigmoid", "softmax", "greedy", "group_limited_greedy", "", "4"]),
                      st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
    keys = ("topk_method", "scoring_func", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "rope_interleave")

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(arch=st.sampled_from(["deepseek_v2", "deepseek_v3"]), over=st.dictionaries(st.sampled_from(keys), value))
    def check(arch, over):
        cfg = tiny_cfg(arch) | over
        try:
            r = check_config(cfg, shape_from_config(cfg))
        except ConfigError as e:
            assert "\n" not in str(e)
        else:
            allowed = ROUTING[cfg["architectures"][0]]
            assert r["topk_method"] in allowed["topk_method"] and r["scoring_func"] in allowed["scoring_func"]
            assert type(r["n_group"]) is type(r["topk_group"]) is int and math.isfinite(r["routed_scaling_factor"])

    check()
