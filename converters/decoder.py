"""The decoder that is exported to ONNX: one module tree for every supported architecture.

Built from plain tensors (float weights, or int4 weights already dequantized to q * scale), so the
same module is both the export source and the PyTorch reference the ONNX graph is checked
against. Module paths give the graph its stable node names (`/model/layers.0/attn/q_proj/MatMul`).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from edge_sdk.modelspec import ModelShape

from .archs import ATTN, MLP, ArchTable


def rope_tables(cfg: dict, arch: ArchTable) -> tuple[torch.Tensor, float]:
    """inv_freq [head_dim / 2] and attention scaling exactly as transformers computes them."""
    from transformers import AutoConfig

    module, cls = arch.rotary.split(":")
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    rot = getattr(importlib.import_module(module), cls)(hf_cfg)
    return rot.inv_freq.detach().float().clone(), float(rot.attention_scaling)


class Linear(nn.Module):
    """y = x @ weight (+ bias); weight is stored [in, out] so it feeds MatMul untransposed."""

    def __init__(self, weight_in_out: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight_in_out, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        y = torch.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, s: ModelShape, lin: dict[str, Linear]):
        super().__init__()
        for name in ATTN:
            setattr(self, name, lin[name])
        self.s = s

    def forward(self, x, cos, sin, mask, past_k, past_v):
        s = self.s
        b, t = x.shape[0], x.shape[1]
        # q: [B, H, T, D]; k, v: [B, KVH, T, D]
        q = self.q_proj(x).view(b, t, s.num_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)  # [B, KVH, P+T, D]
        v = torch.cat([past_v, v], dim=2)
        rep = s.num_heads // s.num_kv_heads
        kr = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vr = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = torch.matmul(q, kr.transpose(2, 3)).float() * (s.head_dim ** -0.5) + mask  # [B, H, T, P+T]
        probs = torch.softmax(scores, dim=-1).to(vr.dtype)
        out = torch.matmul(probs, vr).transpose(1, 2).reshape(b, t, s.num_heads * s.head_dim)
        return self.o_proj(out), k, v


class MLPBlock(nn.Module):
    def __init__(self, lin: dict[str, Linear]):
        super().__init__()
        for name in MLP:
            setattr(self, name, lin[name])

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, s: ModelShape, norms: tuple[torch.Tensor, torch.Tensor], lin: dict[str, Linear]):
        super().__init__()
        self.input_layernorm = RMSNorm(norms[0], s.rms_norm_eps)
        self.attn = Attention(s, lin)
        self.post_attention_layernorm = RMSNorm(norms[1], s.rms_norm_eps)
        self.mlp = MLPBlock(lin)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        h, k, v = self.attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Body(nn.Module):
    def __init__(self, embed, layers, norm):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class _Cast:
    """weights[name] converted to dtype on access (and no copy when it already has it)."""

    def __init__(self, weights, dtype):
        self.weights, self.dtype = weights, dtype

    def __getitem__(self, name):
        return self.weights[name].to(self.dtype)

    def get(self, name):
        return self[name] if name in self.weights else None


def trace_stub(s: ModelShape, arch: ArchTable, inv_freq: torch.Tensor, rope_scaling: float, dtype=torch.float32) -> "Decoder":
    """The same graph at a fraction of the size: real heads, head_dim, layers, eps and rope, but small
    hidden / intermediate / vocab (they only set initializer shapes, which the export replaces)."""
    from dataclasses import replace

    small = replace(s, hidden_size=32, intermediate_size=32, vocab_size=16)
    g = torch.Generator().manual_seed(0)
    shapes = {arch.embed: (small.vocab_size, small.hidden_size), arch.final_norm: (small.hidden_size,),
              arch.lm_head: (small.vocab_size, small.hidden_size)}
    q, kv, h, i = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, small.hidden_size, small.intermediate_size
    dims = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    for layer in range(s.num_layers):
        shapes[arch.norm(layer, "input_norm")] = shapes[arch.norm(layer, "post_attn_norm")] = (h,)
        for p, shp in dims.items():
            shapes[f"{arch.linear(layer, p)}.weight"] = shp
            if s.qkv_bias and p in ("q_proj", "k_proj", "v_proj"):
                shapes[f"{arch.linear(layer, p)}.bias"] = (shp[0],)
    # distinct random values, so the exporter never merges two initializers into one
    weights = {k: torch.randn(v, generator=g) for k, v in shapes.items()}
    return Decoder(small, weights, arch, inv_freq, rope_scaling, dtype).eval()


class Decoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), past/present
    ordered key0, value0, key1, value1, ... with layout [B, KVH, S, D]."""

    def __init__(self, s: ModelShape, weights: dict[str, torch.Tensor], arch: ArchTable,
                 inv_freq: torch.Tensor, rope_scaling: float = 1.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.s = s
        w = _Cast(weights, dtype)  # one tensor at a time: a 1.5B model is never held twice here

        def linear(name):
            bias = w.get(f"{name}.bias")
            return Linear(w[f"{name}.weight"].t().contiguous(), bias)

        layers = []
        for i in range(s.num_layers):
            lin = {p: linear(arch.linear(i, p)) for p in (*ATTN, *MLP)}
            layers.append(Layer(s, (w[arch.norm(i, "input_norm")], w[arch.norm(i, "post_attn_norm")]), lin))
        self.model = Body(w[arch.embed], layers, RMSNorm(w[arch.final_norm], s.rms_norm_eps))
        head = w[arch.lm_head] if arch.lm_head in weights else w[arch.embed]
        self.lm_head = Linear(head.t().contiguous(), None)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.rope_scaling = rope_scaling
        self.dtype = dtype

    def forward(self, input_ids, attention_mask, position_ids, *past):
        x = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        t = input_ids.shape[1]
        total = attention_mask.shape[1]
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(self.dtype).unsqueeze(1)  # [B, 1, T, D]
        sin = (emb.sin() * self.rope_scaling).to(self.dtype).unsqueeze(1)
        q_pos = torch.arange(t, device=input_ids.device).unsqueeze(-1) + (total - t)  # [T, 1]
        k_pos = torch.arange(total, device=input_ids.device).unsqueeze(0)  # [1, P+T]
        allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(1)
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)  # [B, 1, T, P+T] fp32
        present = []
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            present += [k, v]
        logits = self.lm_head(self.model.norm(x)).float()
        return (logits, *present)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        s = self.s
        return [torch.zeros(batch, s.num_kv_heads, 0, s.head_dim, dtype=self.dtype) for _ in range(2 * s.num_layers)]
