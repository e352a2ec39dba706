"""Parameter counts and KV sizes against hand-computed values for real DeepSeek configs."""

import json

import pytest

from edge_sdk.errors import ConfigError, UnsupportedArchitectureError
from edge_sdk.modelspec import count_params, shape_from_config
from edge_sdk.planner import resolve_model


def shape(name):
    cfg, _ = resolve_model(name)
    return shape_from_config(cfg, name)


def dense_total(vocab, hidden, layers, heads, kv_heads, inter, qkv_bias, tied):
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + 2 * hidden * kv_heads * head_dim  # q, o + k, v
    if qkv_bias:
        attn += hidden + 2 * kv_heads * head_dim
    mlp = 3 * hidden * inter
    per_layer = attn + mlp + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


@pytest.mark.parametrize(
    "name, expected",
    [
        ("deepseek-r1-distill-qwen-1.5b", 1_777_088_000),  # untied embeddings
        ("deepseek-llm-7b-chat", 6_910_365_696),
        ("deepseek-r1-distill-llama-8b", 8_030_261_248),
    ],
)
def test_dense_param_counts_equal_published_totals(name, expected):
    assert count_params(shape(name)).total == expected


@pytest.mark.parametrize(
    "name, args",
    [
        ("deepseek-r1-distill-qwen-1.5b", (151936, 1536, 28, 12, 2, 8960, True, False)),
        ("deepseek-r1-distill-qwen-7b", (152064, 3584, 28, 28, 4, 18944, True, False)),
        ("deepseek-r1-distill-qwen-14b", (152064, 5120, 48, 40, 8, 13824, True, False)),
        ("deepseek-r1-distill-qwen-32b", (152064, 5120, 64, 40, 8, 27648, True, False)),
        ("deepseek-r1-distill-llama-70b", (128256, 8192, 80, 64, 8, 28672, False, False)),
        ("deepseek-coder-1.3b-instruct", (32256, 2048, 24, 16, 16, 5504, False, False)),
    ],
)
def test_dense_param_counts_by_hand(name, args):
    assert count_params(shape(name)).total == dense_total(*args)


def test_component_split_of_qwen_1_5b():
    c = count_params(shape("deepseek-r1-distill-qwen-1.5b"))
    assert c.embeddings == c.lm_head == 151936 * 1536
    assert c.attention == 28 * (1536 * 1536 * 2 + 2 * 1536 * 256 + 1536 + 2 * 256)
    assert c.mlp == 28 * 3 * 1536 * 8960
    assert c.norms == 28 * 2 * 1536 + 1536
    assert c.router == 0


def test_tied_embeddings_count_once():
    cfg, _ = resolve_model("deepseek-r1-distill-qwen-1.5b")
    tied = count_params(shape_from_config(dict(cfg, tie_word_embeddings=True)))
    assert tied.lm_head == 0
    assert tied.total == 1_777_088_000 - 151936 * 1536


@pytest.mark.parametrize(
    "name, kv_bytes_fp16",
    [
        ("deepseek-r1-distill-qwen-1.5b", 2 * 28 * 2 * 128 * 2),  # GQA: K and V, 2 KV heads
        ("deepseek-r1-distill-llama-8b", 2 * 32 * 8 * 128 * 2),
        ("deepseek-llm-7b-chat", 2 * 30 * 32 * 128 * 2),  # MHA
        ("deepseek-v2-lite-chat", 27 * (512 + 64) * 2),  # MLA: latent + rope key
        ("deepseek-v3", 61 * (512 + 64) * 2),
    ],
)
def test_kv_bytes_per_token(name, kv_bytes_fp16):
    assert shape(name).kv_elements_per_token() * 2 == kv_bytes_fp16


def mla_moe_total(c):
    """DeepSeek-V2/V3 parameters from the config, written out independently of the code under test."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    q = h * heads * qk if not c["q_lora_rank"] else h * c["q_lora_rank"] + c["q_lora_rank"] * heads * qk + c["q_lora_rank"]
    attn = q + h * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) + c["kv_lora_rank"] * heads * (c["qk_nope_head_dim"] + c["v_head_dim"]) \
        + heads * c["v_head_dim"] * h + c["kv_lora_rank"]
    dense_mlp = 3 * h * c["intermediate_size"]
    moe = 3 * h * c["moe_intermediate_size"] * (c["n_routed_experts"] + c["n_shared_experts"]) + c["n_routed_experts"] * h
    if c["architectures"][0] == "DeepseekV3ForCausalLM":
        moe += c["n_routed_experts"]  # e_score_correction_bias
    k, n = c["first_k_dense_replace"], c["num_hidden_layers"]
    return 2 * c["vocab_size"] * h + n * (attn + 2 * h) + k * dense_mlp + (n - k) * moe + h


@pytest.mark.parametrize("name, billions, active_billions", [("deepseek-v2-lite-chat", 15.7, 2.4), ("deepseek-v3", 671.0, 37.0)])
def test_moe_total_and_active(name, billions, active_billions):
    cfg, _ = resolve_model(name)
    c = count_params(shape(name))
    assert c.total == mla_moe_total(cfg)
    assert c.total / 1e9 == pytest.approx(billions, rel=0.01)  # published sizes (V3 without its MTP layer)
    assert c.active_per_token / 1e9 == pytest.approx(active_billions, rel=0.05)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="Qwen2ForCausalLM.*LlamaForCausalLM"):
        shape_from_config({"architectures": ["MistralForCausalLM"], "hidden_size": 8})


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"num_hidden_layers": "28"}, "num_hidden_layers"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_key_value_heads": 5}, "multiple"),
    ],
)
def test_malformed_values_are_named(patch, match):
    cfg, _ = resolve_model("deepseek-r1-distill-qwen-1.5b")
    cfg = {k: v for k, v in dict(cfg, **patch).items() if v is not None}
    with pytest.raises(ConfigError, match=match):
        shape_from_config(cfg)


def test_model_dir_and_config_file_are_both_accepted(tmp_path):
    cfg, _ = resolve_model("deepseek-r1-distill-qwen-1.5b")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a, _ = resolve_model(tmp_path)
    b, _ = resolve_model(tmp_path / "config.json")
    assert a == b == cfg
