"""Per-architecture tables: where each weight lives in a Hugging Face checkpoint.

The decoder graph is the same for every supported architecture; only names and bias flags differ,
so an architecture is one row of data.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_sdk.errors import UnsupportedArchitectureError

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchTable:
    name: str
    layer_prefix: str = "model.layers.{i}"
    attn: str = "self_attn"
    mlp: str = "mlp"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    qkv_bias_default: bool = False
    rotary: str = ""  # transformers class computing inv_freq (handles every rope_type the architecture has)
    mla: bool = False  # MLA + MoE: converted by deepseek_v2.py into mla.py's graph

    def linear(self, i: int, proj: str) -> str:
        """HF module name of one decoder linear, e.g. model.layers.0.self_attn.q_proj."""
        block = self.attn if proj in ATTN else self.mlp
        return f"{self.layer_prefix.format(i=i)}.{block}.{proj}"

    def norm(self, i: int, which: str) -> str:
        return f"{self.layer_prefix.format(i=i)}.{getattr(self, which)}.weight"


ARCHS: dict[str, ArchTable] = {
    "Qwen2ForCausalLM": ArchTable("Qwen2ForCausalLM", qkv_bias_default=True,
                                    rotary="transformers.models.qwen2.modeling_qwen2:Qwen2RotaryEmbedding"),
    "LlamaForCausalLM": ArchTable("LlamaForCausalLM", rotary="transformers.models.llama.modeling_llama:LlamaRotaryEmbedding"),
    # MLA + MoE: its own graph and conversion (mla.py, deepseek_v2.py); this row names the checkpoint's ends
    "DeepseekV2ForCausalLM": ArchTable("DeepseekV2ForCausalLM", mla=True,
                                         rotary="transformers.models.deepseek_v2.modeling_deepseek_v2:DeepseekV2RotaryEmbedding"),
    # V2's graph with V3's routing (sigmoid + correction bias, noaux_tc groups); deepseek_v2.ROUTING holds the difference
    "DeepseekV3ForCausalLM": ArchTable("DeepseekV3ForCausalLM", mla=True,
                                         rotary="transformers.models.deepseek_v3.modeling_deepseek_v3:DeepseekV3RotaryEmbedding"),
}


def arch_for(config: dict, source: str = "config.json") -> ArchTable:
    archs = config.get("architectures") or [config.get("model_type")]
    name = archs[0] if archs else None
    if name not in ARCHS:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {name!r} cannot be converted",
            hint=f"supported: {', '.join(ARCHS)} (DeepSeek-R1-Distill-Qwen/-Llama, deepseek-llm, deepseek-coder, DeepSeek-V2-Lite, DeepSeek-V3 architecture)",
        )
    return ARCHS[name]


def linear_names(num_layers: int, arch: ArchTable) -> list[str]:
    """Every quantized decoder linear, in graph and weights-file order."""
    return [arch.linear(i, p) for i in range(num_layers) for p in (*ATTN, *MLP)]
