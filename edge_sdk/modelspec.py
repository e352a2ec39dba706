"""Model shapes read from a Hugging Face ``config.json``, and parameter counts by component.

Architecture differences are data: one ``ArchSpec`` per supported architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    attention: str  # "gqa" | "mla"
    qkv_bias_default: bool  # Qwen2 has q/k/v biases; Llama only when attention_bias is set
    moe: bool
    family: str  # the DeepSeek releases built on it


ARCHITECTURES: dict[str, ArchSpec] = {
    "Qwen2ForCausalLM": ArchSpec("gqa", True, False, "DeepSeek-R1-Distill-Qwen 1.5B/7B/14B/32B"),
    "LlamaForCausalLM": ArchSpec("gqa", False, False, "DeepSeek-R1-Distill-Llama 8B/70B, deepseek-llm, deepseek-coder"),
    "DeepseekV2ForCausalLM": ArchSpec("mla", False, True, "DeepSeek-V2 / V2-Lite"),
    "DeepseekV3ForCausalLM": ArchSpec("mla", False, True, "DeepSeek-V3 / R1"),
}


def supported_architectures() -> str:
    return ", ".join(ARCHITECTURES)


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    torch_dtype: str
    rms_norm_eps: float = 1e-6
    # MLA (DeepSeek-V2/V3)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    router_bias: bool = False  # V3's e_score_correction_bias

    @property
    def spec(self) -> ArchSpec:
        return ARCHITECTURES[self.architecture]

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def kv_elements_per_token(self) -> int:
        """Cached KV elements per token over all layers.

        GQA caches K and V per KV head; MLA caches the compressed latent plus the shared rope key.
        """
        if self.spec.attention == "mla":
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def _need(cfg: dict, key: str, path: str):
    if key not in cfg:
        raise ConfigError(f"{path}: config.json has no '{key}'", hint="is this a Hugging Face causal-LM config.json?")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    return value


def load_config(path: str | Path) -> tuple[dict, Path]:
    """Read config.json from a model directory, a bundle directory or the file itself."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "config.json", p / "source" / "config.json"):
            if candidate.exists():
                p = candidate
                break
        else:
            raise ConfigError(f"{path}: no config.json in this directory", hint="pass a Hugging Face model directory or its config.json")
    if not p.exists():
        raise ConfigError(f"{path}: no such file or directory")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid JSON ({exc})", hint="check the file is a Hugging Face config.json") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: expected a JSON object, got {type(cfg).__name__}")
    return cfg, p


def shape_from_config(cfg: dict, source: str = "config.json") -> ModelShape:
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else cfg.get("model_type")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:  # a list or object there: unhashable
        raise UnsupportedArchitectureError(
            f"{source}: architecture {arch!r} is not supported", hint=f"supported: {supported_architectures()}"
        )
    spec = ARCHITECTURES[arch]
    hidden = _need(cfg, "hidden_size", source)
    heads = _need(cfg, "num_attention_heads", source)
    if hidden % heads and "head_dim" not in cfg:
        raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    common = dict(
        architecture=arch,
        hidden_size=hidden,
        num_layers=_need(cfg, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        intermediate_size=_need(cfg, "intermediate_size", source),
        vocab_size=_need(cfg, "vocab_size", source),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", spec.qkv_bias_default)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    )
    if heads % common["num_kv_heads"]:
        raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {common['num_kv_heads']}")
    if spec.attention == "mla":
        common.update(
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=_need(cfg, "kv_lora_rank", source),
            qk_nope_head_dim=_need(cfg, "qk_nope_head_dim", source),
            qk_rope_head_dim=_need(cfg, "qk_rope_head_dim", source),
            v_head_dim=_need(cfg, "v_head_dim", source),
            n_routed_experts=int(cfg.get("n_routed_experts") or 0),
            n_shared_experts=int(cfg.get("n_shared_experts") or 0),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
            first_k_dense_replace=int(cfg.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(cfg.get("moe_layer_freq") or 1),
            router_bias=arch == "DeepseekV3ForCausalLM",
        )
        common["num_kv_heads"] = heads
        _check_mla(cfg, common, source)
    return ModelShape(**common)


def _check_mla(cfg: dict, c: dict, source: str) -> None:
    """MLA and MoE dimensions that must agree with each other (one line naming the disagreement)."""
    q = c["q_lora_rank"]
    if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q <= 0):
        raise ConfigError(f"{source}: 'q_lora_rank' must be null or a positive integer, got {q!r}")
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    if cfg.get("qk_head_dim") not in (None, qk):
        raise ConfigError(f"{source}: qk_head_dim {cfg['qk_head_dim']} is not qk_nope_head_dim + qk_rope_head_dim = {qk}",
                          hint="the query/key head is the no-rope part followed by the rope part")
    if cfg.get("head_dim") not in (None, c["qk_rope_head_dim"]):
        raise ConfigError(f"{source}: head_dim {cfg['head_dim']} is not qk_rope_head_dim {c['qk_rope_head_dim']}",
                          hint="for MLA models head_dim is the rotary dimension")
    if c["qk_rope_head_dim"] % 2:
        raise ConfigError(f"{source}: qk_rope_head_dim {c['qk_rope_head_dim']} is odd", hint="rotary pairs need an even dimension")
    e, k = c["n_routed_experts"], c["num_experts_per_tok"]
    if e and not 1 <= k <= e:
        raise ConfigError(f"{source}: num_experts_per_tok {k} must be between 1 and n_routed_experts {e}",
                          hint="each token is routed to num_experts_per_tok of the n_routed_experts experts")


# --- parameter counts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """One weight matrix [out, in] of a decoder layer (what int4 quantization applies to)."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    count: int = 1  # identical copies (experts)
    active: int = 1  # copies read per decoded token

    @property
    def params(self) -> int:
        return self.count * (self.in_features * self.out_features + (self.out_features if self.bias else 0))


def attention_linears(s: ModelShape) -> list[Linear]:
    h, hd = s.hidden_size, s.head_dim
    if s.spec.attention == "gqa":
        kv = s.num_kv_heads * hd
        return [
            Linear("q_proj", h, s.num_heads * hd, s.qkv_bias),
            Linear("k_proj", h, kv, s.qkv_bias),
            Linear("v_proj", h, kv, s.qkv_bias),
            Linear("o_proj", s.num_heads * hd, h),
        ]
    q_dim = s.num_heads * (s.qk_nope_head_dim + s.qk_rope_head_dim)
    q = (
        [Linear("q_proj", h, q_dim)]
        if not s.q_lora_rank
        else [Linear("q_a_proj", h, s.q_lora_rank), Linear("q_b_proj", s.q_lora_rank, q_dim)]
    )
    return q + [
        Linear("kv_a_proj_with_mqa", h, s.kv_lora_rank + s.qk_rope_head_dim),
        Linear("kv_b_proj", s.kv_lora_rank, s.num_heads * (s.qk_nope_head_dim + s.v_head_dim)),
        Linear("o_proj", s.num_heads * s.v_head_dim, h),
    ]


def mlp_linears(s: ModelShape, layer: int) -> list[Linear]:
    h = s.hidden_size
    if not s.is_moe_layer(layer):
        i = s.intermediate_size
        return [Linear("gate_proj", h, i), Linear("up_proj", h, i), Linear("down_proj", i, h)]
    e, k, mi = s.n_routed_experts, s.num_experts_per_tok, s.moe_intermediate_size
    out = [
        Linear("experts.gate_proj", h, mi, count=e, active=k),
        Linear("experts.up_proj", h, mi, count=e, active=k),
        Linear("experts.down_proj", mi, h, count=e, active=k),
    ]
    if s.n_shared_experts:
        si = mi * s.n_shared_experts
        out += [Linear("shared_experts.gate_proj", h, si), Linear("shared_experts.up_proj", h, si), Linear("shared_experts.down_proj", si, h)]
    return out


def layer_norm_params(s: ModelShape) -> int:
    """input_layernorm + post_attention_layernorm (+ MLA's q_a/kv_a layernorms)."""
    n = 2 * s.hidden_size
    if s.spec.attention == "mla":
        n += s.kv_lora_rank + (s.q_lora_rank or 0)
    return n


def router_params(s: ModelShape, layer: int) -> int:
    if not s.is_moe_layer(layer):
        return 0
    return s.n_routed_experts * s.hidden_size + (s.n_routed_experts if s.router_bias else 0)


@dataclass(frozen=True)
class ParamCounts:
    embeddings: int
    attention: int
    mlp: int  # dense MLPs + all experts + shared experts
    router: int
    norms: int
    lm_head: int  # 0 when tied to the embeddings
    active_per_token: int  # parameters read to decode one token (MoE: top-k experts only)

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.mlp + self.router + self.norms + self.lm_head

    def as_dict(self) -> dict:
        return {**self.__dict__, "total": self.total}


def count_params(s: ModelShape) -> ParamCounts:
    attn = mlp = router = active = 0
    for i in range(s.num_layers):
        a = sum(l.params for l in attention_linears(s))
        m_lin = mlp_linears(s, i)
        attn += a
        mlp += sum(l.params for l in m_lin)
        router += router_params(s, i)
        active += a + sum(l.params // l.count * l.active for l in m_lin) + router_params(s, i) + layer_norm_params(s)
    embed = s.vocab_size * s.hidden_size
    norms = s.num_layers * layer_norm_params(s) + s.hidden_size
    lm_head = 0 if s.tie_word_embeddings else embed
    # decoding reads one embedding row, the final norm and the whole lm_head (tied or not)
    active += s.hidden_size + s.hidden_size + embed
    return ParamCounts(embed, attn, mlp, router, norms, lm_head, active)
