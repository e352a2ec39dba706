"""Tiny DeepSeek-architecture checkpoints (random or trained weights) with a small real tokenizer.

Used by the test fixtures, the tiny-model training script and the conversion benchmark: a model
directory exactly like one from the Hugging Face Hub (config.json, safetensors, tokenizer.json,
tokenizer_config.json), built locally in seconds.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from edge_sdk.chat import DEEPSEEK_R1_TEMPLATE, DEEPSEEK_V2_TEMPLATE

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]

# DeepSeek-R1's chat template: the one the device runtime renders natively; a DeepSeek-V2 checkpoint ships
# DeepSeek-V2-Chat's (V3 and R1 share the V3 architecture, so a V3-config model keeps R1's)
CHAT_TEMPLATE = DEEPSEEK_R1_TEMPLATE
CHAT_TEMPLATES = {"deepseek_v2": DEEPSEEK_V2_TEMPLATE}

TINY_CONFIGS = {
    # hidden sizes are multiples of 128 so every linear has whole int4 groups of 128
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2, "attention_dropout": 0.0,
    },
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256},
    },
    # MLA + MoE at DeepSeek-V2-Lite's proportions: 4 routed experts (2 active), 1 shared, first layer dense;
    # kv_lora_rank and the MoE width are 128 so kv_b_proj and down_proj have whole int4 groups
    "deepseek_v2": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
        "q_lora_rank": None, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32,
        "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    },
    # DeepSeek-V3 / R1 routing at the same scale: sigmoid scores plus a correction bias (random here, so it
    # changes selections), 8 experts in 4 groups of which 2 are kept, top-2, normalised, scaled by 2.5;
    # q_lora_rank set as in V3 (q_a_proj -> q_a_layernorm -> q_b_proj)
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
        "q_lora_rank": 128, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4,
        "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rope_interleave": True,
    },
}


def default_calibration_text() -> str:
    root = resources.files("edge_sdk.data").joinpath("calib")
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(root.iterdir(), key=lambda p: p.name) if p.name.endswith(".txt"))


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on `texts`, with DeepSeek's special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write_tokenizer(tok, directory: Path, *, pad_token: bool = True, chat_template: str = CHAT_TEMPLATE) -> None:
    tok.save(str(directory / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 16384, "chat_template": chat_template,
        "clean_up_tokenization_spaces": False, "legacy": True,
    }
    if not pad_token:
        del cfg["pad_token"]
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def tiny_config(arch: str, vocab_size: int, **overrides) -> dict:
    if arch not in TINY_CONFIGS:
        raise KeyError(f"tiny architecture {arch!r}: choose one of {', '.join(TINY_CONFIGS)}")
    cfg = dict(TINY_CONFIGS[arch], vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2, torch_dtype="float32")
    cfg.update(overrides)
    return cfg


def build_model_dir(directory: str | Path, arch: str = "qwen2", *, seed: int = 0, config: dict | None = None,
                    tokenizer=None, texts: list[str] | None = None, init_std: float = 0.02, pad_token: bool = True) -> Path:
    """Write a random-weight checkpoint of `arch` (or of `config`) with a tokenizer into `directory`
    (what torch and transformers print meanwhile goes to the conversion log, see thirdparty_log).

    pad_token=False writes what Llama-3-derived checkpoints ship: no `pad_token` in tokenizer_config.json
    and `pad_token_id: null` in config.json (same vocabulary and weights as with a pad token)."""
    from .thirdparty_log import third_party_output

    with third_party_output():
        return _build_model_dir(directory, arch, seed, config, tokenizer, texts, init_std, pad_token)


def _build_model_dir(directory, arch, seed, config, tokenizer, texts, init_std, pad_token) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or build_tokenizer(texts or [default_calibration_text()])
    cfg = config or tiny_config(arch, tok.get_vocab_size())
    if not pad_token:
        cfg = dict(cfg, pad_token_id=None)
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"}, architectures=cfg["architectures"])
    hf_cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1; real checkpoints have neither
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, init_std)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
        for name, b in model.named_buffers():  # V3's router correction bias (HF initialises it to 0)
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 2 * init_std)
    model.save_pretrained(d, safe_serialization=True)
    write_tokenizer(tok, d, pad_token=pad_token, chat_template=CHAT_TEMPLATES.get(arch, CHAT_TEMPLATE))
    return d
