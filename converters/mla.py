"""The DeepSeek-V2 decoder exported to ONNX: multi-head latent attention (MLA) and fine-grained MoE.

Same interface as decoder.Decoder (forward(input_ids, attention_mask, position_ids, *past) ->
(logits, *present)), so the pipeline's checks and trace apply unchanged. Module paths follow the
checkpoint's names (model.layers.1.mlp.experts.0.gate_proj), so onnx_export.rewrite finds every
quantized linear.

Cache: per layer the normalised latent (kv_lora_rank) and the rotated shared rope key
(qk_rope_head_dim), [B, 1, S, kv_lora_rank + qk_rope_head_dim], carried as two halves of the last
axis in the `key` and `value` slots ([B, 1, S, (kv_lora_rank + qk_rope_head_dim) / 2] each), so the
runtime's two-slot cache holds exactly the latent and no more. Keys and values are expanded from
the latent through kv_b_proj at every step.

MoE: onnxruntime's com.microsoft QMoE over each layer's routed experts stacked as stored (uint4,
fp16 group scales): each token reads and computes only its top-k experts; the router's weights select
and mix them exactly (see _QMoE). The shared experts are added unweighted.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from edge_sdk.modelspec import ModelShape

from .decoder import Linear, RMSNorm

ROTARY = "transformers.models.deepseek_v2.modeling_deepseek_v2:DeepseekV2RotaryEmbedding"


def attention_scale(cfg: dict, s: ModelShape) -> float:
    """Softmax scale: qk_head_dim ** -0.5, times yarn's mscale² when the rope is scaled (as transformers)."""
    scale = (s.qk_nope_head_dim + s.qk_rope_head_dim) ** -0.5
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default" and rope.get("mscale_all_dim"):
        factor = float(rope["factor"])
        m = 0.1 * float(rope["mscale_all_dim"]) * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale *= m * m
    return scale


def rope_tables(cfg: dict) -> tuple[torch.Tensor, float]:
    """inv_freq [qk_rope_head_dim / 2] and the cos/sin scaling, from transformers' own rotary class."""
    from transformers import AutoConfig

    module, cls = ROTARY.split(":")
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    rot = getattr(importlib.import_module(module), cls)(hf_cfg)
    return rot.inv_freq.detach().float().clone(), float(rot.attention_scaling)


def rotate_pairs(x, cos, sin):
    """Rotary embedding on interleaved pairs (x[2j], x[2j+1]), as DeepSeek's complex form. cos/sin: [B, 1, T, D/2]."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


class MLAttention(nn.Module):
    def __init__(self, s: ModelShape, lin: dict, norms: dict, scale: float):
        super().__init__()
        for name, m in lin.items():
            setattr(self, name, m)
        for name, m in norms.items():
            setattr(self, name, m)
        self.s, self.scale = s, scale

    def forward(self, x, cos, sin, mask, past_k, past_v):
        s = self.s
        b, t = x.shape[0], x.shape[1]
        nope, rope, r = s.qk_nope_head_dim, s.qk_rope_head_dim, s.kv_lora_rank
        q = self.q_proj(x) if s.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, s.num_heads, nope + rope).transpose(1, 2)  # [B, H, T, nope + rope]
        q_nope, q_pe = q[..., :nope], rotate_pairs(q[..., nope:], cos, sin)
        ckv = self.kv_a_proj_with_mqa(x)  # [B, T, r + rope]
        latent = self.kv_a_layernorm(ckv[..., :r]).unsqueeze(1)  # [B, 1, T, r]
        k_pe = rotate_pairs(ckv[..., r:].unsqueeze(1), cos, sin)  # [B, 1, T, rope]
        cache = torch.cat([torch.cat([past_k, past_v], dim=-1), torch.cat([latent, k_pe], dim=-1)], dim=2)  # [B, 1, S, r + rope]
        half = (r + rope) // 2
        kv = self.kv_b_proj(cache[..., :r]).view(b, -1, s.num_heads, nope + s.v_head_dim).transpose(1, 2)  # [B, H, S, nope + v]
        k = torch.cat([kv[..., :nope], cache[..., r:].expand(-1, s.num_heads, -1, -1)], dim=-1)
        scores = torch.matmul(torch.cat([q_nope, q_pe], dim=-1), k.transpose(2, 3)).float() * self.scale + mask
        probs = torch.softmax(scores, dim=-1).to(kv.dtype)
        out = torch.matmul(probs, kv[..., nope:]).transpose(1, 2).reshape(b, t, s.num_heads * s.v_head_dim)
        return self.o_proj(out), cache[..., :half], cache[..., half:]


class DenseMLP(nn.Module):
    def __init__(self, lin: dict):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, lin[name])

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Routing weights [B, T, E], zero outside each token's top-k, from the routed experts' logits (fp32),
    as transformers computes them. softmax (V2): top-k, group-limited by each group's best score when set.
    sigmoid with noaux_tc (V3): the correction bias is added for the selection only, groups ranked by the
    sum of their best two; the weights are the uncorrected scores. Then normalised to sum 1 when
    norm_topk_prob, times routed_scaling_factor."""

    def __init__(self, weight_in_out: torch.Tensor, s: ModelShape, routing: dict, correction_bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight_in_out, requires_grad=False)
        # [E], fp32: a large common offset whose small spread decides the top-k
        self.e_score_correction_bias = None if correction_bias is None else nn.Parameter(correction_bias.float(), requires_grad=False)
        self.k, self.e = s.num_experts_per_tok, s.n_routed_experts
        self.method, self.groups, self.topk_group = routing["topk_method"], routing["n_group"], routing["topk_group"]
        self.sigmoid, self.normalise = routing["scoring_func"] == "sigmoid", routing["norm_topk_prob"]
        self.factor = routing["routed_scaling_factor"]

    def forward(self, x):
        logits = torch.matmul(x.float(), self.weight)  # [B, T, E]; the weight is fp32 already
        scores = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
        choice = scores + self.e_score_correction_bias if self.e_score_correction_bias is not None else scores
        if self.method in ("group_limited_greedy", "noaux_tc"):
            choice = self.keep_groups(choice)
        idx = torch.topk(choice, self.k, dim=-1).indices  # [B, T, k]
        w = torch.gather(scores, -1, idx)
        if self.normalise:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return torch.zeros_like(scores).scatter(-1, idx, w * self.factor)

    def keep_groups(self, choice):
        """choice with every expert outside the topk_group best groups at -inf."""
        grouped = choice.view(*choice.shape[:-1], self.groups, self.e // self.groups)  # [B, T, G, E / G]
        rank = torch.topk(grouped, 2, dim=-1).values.sum(-1) if self.method == "noaux_tc" else grouped.amax(-1)  # [B, T, G]
        top = torch.topk(rank, self.topk_group, dim=-1).indices  # [B, T, topk_group]
        keep = torch.zeros_like(rank).scatter(-1, top, 1.0).unsqueeze(-1) > 0
        return torch.where(keep, grouped, torch.full_like(grouped, float("-inf"))).flatten(-2)


class Stacked(nn.Module):
    """One weight per routed expert, stacked: [E, out, in] (the experts' layout in QMoE)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(w, requires_grad=False)


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[E, I, ...] twice -> [E, 2I, ...] with rows a0, b0, a1, b1, ... (QMoE's fused SwiGLU layout)."""
    return torch.stack((a, b), dim=2).flatten(1, 2)


def routed_experts(x, w, gate_up, down):
    """sum over the experts each token chose of w * down(silu(gate(x)) * up(x)); only chosen experts are
    computed. x [N, H], w [N, E] (0 outside the top-k), gate_up [E, 2I, H] interleaved, down [E, H, I]."""
    out = torch.zeros_like(x)
    for e in torch.nonzero(w.amax(0) > 0).flatten().tolist():
        rows = torch.nonzero(w[:, e] > 0).flatten()
        h = torch.matmul(x[rows], gate_up[e].t())  # [n, 2I]
        y = torch.matmul(nn.functional.silu(h[:, 0::2]) * h[:, 1::2], down[e].t())
        out = out.index_add(0, rows, y * w[rows, e:e + 1])
    return out


class _QMoE(torch.autograd.Function):
    """Traced as onnxruntime's com.microsoft QMoE: each token reads and computes only its top-k experts.
    The router's weights go in twice: as router_probs they select the top-k (the k nonzero entries), as
    router_weights they mix the outputs as they are, so any routing (group-limited, scaled) is exact.
    onnx_export.rewrite points gate_up / down at the stored uint4 experts and sets block_size."""

    @staticmethod
    def forward(ctx, x, w, gate_up, down, k):
        return routed_experts(x, w, gate_up, down)

    @staticmethod
    def symbolic(g, x, w, gate_up, down, k):
        def none():
            return g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())

        out = g.op("com.microsoft::QMoE", x, w, gate_up, none(), none(), down, none(), none(), none(), none(), none(),
                   none(), none(), none(), w, k_i=k, expert_weight_bits_i=4, activation_type_s="swiglu", swiglu_fusion_i=1,
                   activation_alpha_f=1.0, activation_beta_f=0.0, normalize_routing_weights_i=0, use_sparse_mixer_i=0,
                   accuracy_level_i=0)
        out.setType(x.type())
        return out


class MoE(nn.Module):
    """Shared experts (unweighted) plus the top-k routed experts of each token, only those computed."""

    def __init__(self, router: Router, experts: list[DenseMLP], shared: DenseMLP | None):
        super().__init__()
        self.gate = router
        self.experts = nn.Module()  # Linear weights are [in, out]; QMoE takes [E, out, in]
        self.experts.gate_up_proj = Stacked(torch.stack([interleave(e.gate_proj.weight.t()[None], e.up_proj.weight.t()[None])[0]
                                                         for e in experts]))
        self.experts.down_proj = Stacked(torch.stack([e.down_proj.weight.t() for e in experts]))
        self.shared_experts = shared

    def forward(self, x):
        w = self.gate(x).to(x.dtype)  # [B, T, E]
        flat = x.reshape(-1, x.shape[-1])
        routed = _QMoE.apply(flat, w.reshape(-1, w.shape[-1]), self.experts.gate_up_proj.weight,
                             self.experts.down_proj.weight, self.gate.k).reshape(x.shape)
        return routed + self.shared_experts(x) if self.shared_experts is not None else routed


class MLALayer(nn.Module):
    def __init__(self, s, attn, mlp, norms):
        super().__init__()
        self.input_layernorm = RMSNorm(norms[0], s.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(norms[1], s.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, cos, sin, mask, past_k, past_v):
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class _Body(nn.Module):
    def __init__(self, embed, layers, norm):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers = nn.ModuleList(layers)
        self.norm = norm


def attention_linears(s: ModelShape) -> tuple[str, ...]:
    q = ("q_proj",) if s.q_lora_rank is None else ("q_a_proj", "q_b_proj")
    return (*q, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def attention_norms(s: ModelShape) -> tuple[str, ...]:
    return ("kv_a_layernorm",) if s.q_lora_rank is None else ("q_a_layernorm", "kv_a_layernorm")


def mlp_linears(s: ModelShape, i: int) -> list[str]:
    """Module names (relative to the layer's `mlp`) of every linear of layer i's feed-forward block."""
    proj = ("gate_proj", "up_proj", "down_proj")
    if not s.is_moe_layer(i):
        return list(proj)
    names = [f"experts.{e}.{p}" for e in range(s.n_routed_experts) for p in proj]
    return names + ([f"shared_experts.{p}" for p in proj] if s.n_shared_experts else [])


class MLADecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present); past/present
    per layer: key, value halves of [latent, rope key], [B, 1, S, (kv_lora_rank + qk_rope_head_dim) / 2]."""

    def __init__(self, s: ModelShape, weights, routing: dict, inv_freq: torch.Tensor, rope_scaling: float, scale: float):
        super().__init__()
        self.s = s
        attention = self.attention_class()

        def w(name):
            return weights[name].float()

        def linear(name):
            return Linear(w(f"{name}.weight").t().contiguous(), None)

        layers = []
        for i in range(s.num_layers):
            p = f"model.layers.{i}"
            attn = attention(s, {n: linear(f"{p}.self_attn.{n}") for n in attention_linears(s)},
                               {n: RMSNorm(w(f"{p}.self_attn.{n}.weight"), s.rms_norm_eps) for n in attention_norms(s)}, scale)
            if s.is_moe_layer(i):
                block = lambda prefix: DenseMLP({n: linear(f"{prefix}.{n}") for n in ("gate_proj", "up_proj", "down_proj")})  # noqa: E731
                bias = w(f"{p}.mlp.gate.e_score_correction_bias") if s.router_bias else None
                mlp = MoE(Router(w(f"{p}.mlp.gate.weight").t().contiguous(), s, routing, bias),
                          [block(f"{p}.mlp.experts.{e}") for e in range(s.n_routed_experts)],
                          block(f"{p}.mlp.shared_experts") if s.n_shared_experts else None)
            else:
                mlp = DenseMLP({n: linear(f"{p}.mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj")})
            layers.append(MLALayer(s, attn, mlp, (w(f"{p}.input_layernorm.weight"), w(f"{p}.post_attention_layernorm.weight"))))
        self.model = _Body(w("model.embed_tokens.weight"), layers, RMSNorm(w("model.norm.weight"), s.rms_norm_eps))
        head = w("lm_head.weight") if "lm_head.weight" in weights else w("model.embed_tokens.weight")
        self.lm_head = Linear(head.t().contiguous(), None)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.rope_scaling = rope_scaling

    @staticmethod
    def attention_class() -> type:
        """The absorbed form (mla_absorbed.py): faster per decode step from a past of ~175 tokens on
        onnxruntime's CPU provider, 13x at 4096 (benchmarks/bench_mla.py); the same cache and weights."""
        from .mla_absorbed import AbsorbedMLAttention

        return AbsorbedMLAttention

    def forward(self, input_ids, attention_mask, position_ids, *past):
        x = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        t, total = input_ids.shape[1], attention_mask.shape[1]
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # [B, T, rope / 2]
        cos = (freqs.cos() * self.rope_scaling).unsqueeze(1)  # [B, 1, T, rope / 2]
        sin = (freqs.sin() * self.rope_scaling).unsqueeze(1)
        q_pos = torch.arange(t, device=input_ids.device).unsqueeze(-1) + (total - t)  # [T, 1]
        k_pos = torch.arange(total, device=input_ids.device).unsqueeze(0)  # [1, P+T]
        allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(1)
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)  # [B, 1, T, P+T]
        present = []
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            present += [k, v]
        return (self.lm_head(self.model.norm(x)).float(), *present)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        half = (self.s.kv_lora_rank + self.s.qk_rope_head_dim) // 2
        return [torch.zeros(batch, 1, 0, half) for _ in range(2 * self.s.num_layers)]


def stub_weights(s: ModelShape) -> tuple[ModelShape, dict[str, torch.Tensor]]:
    """The same graph at a fraction of the size: real heads, MLA dims, experts, layers and rope, small
    hidden / intermediate / vocab / q_lora_rank (only initializer shapes, which the export replaces)."""
    from dataclasses import replace

    small = replace(s, hidden_size=32, intermediate_size=32, moe_intermediate_size=32, vocab_size=16,
                    q_lora_rank=None if s.q_lora_rank is None else 32)
    h, r, rope = small.hidden_size, s.kv_lora_rank, s.qk_rope_head_dim
    shapes = {"model.embed_tokens.weight": (small.vocab_size, h), "model.norm.weight": (h,), "lm_head.weight": (small.vocab_size, h)}
    qd = s.num_heads * (s.qk_nope_head_dim + rope)
    att = {"q_proj": (qd, h), "q_a_proj": (32, h), "q_b_proj": (qd, 32), "kv_a_proj_with_mqa": (r + rope, h),
           "kv_b_proj": (s.num_heads * (s.qk_nope_head_dim + s.v_head_dim), r), "o_proj": (h, s.num_heads * s.v_head_dim),
           "q_a_layernorm": (32,), "kv_a_layernorm": (r,)}
    for i in range(s.num_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        for n in (*attention_linears(small), *attention_norms(small)):
            shapes[f"{p}.self_attn.{n}.weight"] = att[n]
        mi = small.moe_intermediate_size * max(1, s.n_shared_experts) if s.is_moe_layer(i) else small.intermediate_size
        for n in mlp_linears(small, i):
            inter = small.moe_intermediate_size if n.startswith("experts.") else mi
            shapes[f"{p}.mlp.{n}.weight"] = (h, inter) if n.endswith("down_proj") else (inter, h)
        if s.is_moe_layer(i):
            shapes[f"{p}.mlp.gate.weight"] = (s.n_routed_experts, h)
            if s.router_bias:
                shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (s.n_routed_experts,)
    g = torch.Generator().manual_seed(0)
    # distinct random values, so the exporter never merges two initializers into one
    return small, {k: torch.randn(v, generator=g) for k, v in shapes.items()}
