"""MLA attention in the absorbed form: kv_b_proj folded into the query and the output.

Same constructor, forward, outputs and cache as mla.MLAttention; only the arithmetic differs. The
expanded form multiplies the whole cached latent by kv_b_proj at every step ([S, r] x [r, H (nope + v)]).
Here kv_b_proj's weight [r, H, nope + v] is split per head into W_UK [H, nope, r] and W_UV [H, r, v]:

    scores = [q_nope W_UK, q_pe] . [latent, k_pe]     (a query in latent space against the cache as is)
    out    = (probs . latent) W_UV                    (attention over latents, then the value projection)

so nothing of size S x H x head_dim is built. The weight stays the int4 initializer the bundle stores
(`kv_b_proj.weight`, replaced by DequantizeLinear in onnx_export.rewrite): the weights file and the
planner's bytes are unchanged, and the result equals the expanded form's up to fp32 summation order.
onnxruntime dequantizes that weight at every step (it does not constant-fold DequantizeLinear): a
fixed cost per step, against the expanded form's cost that grows with S (benchmarks/bench_mla.py).
"""

from __future__ import annotations

import torch

from .mla import MLAttention, rotate_pairs


class AbsorbedMLAttention(MLAttention):
    def forward(self, x, cos, sin, mask, past_k, past_v):
        s = self.s
        b, t = x.shape[0], x.shape[1]
        h, nope, rope, r, v = s.num_heads, s.qk_nope_head_dim, s.qk_rope_head_dim, s.kv_lora_rank, s.v_head_dim
        q = self.q_proj(x) if s.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, h, nope + rope).transpose(1, 2)  # [B, H, T, nope + rope]
        q_nope, q_pe = q[..., :nope], rotate_pairs(q[..., nope:], cos, sin)
        ckv = self.kv_a_proj_with_mqa(x)  # [B, T, r + rope]
        latent = self.kv_a_layernorm(ckv[..., :r]).unsqueeze(1)  # [B, 1, T, r]
        k_pe = rotate_pairs(ckv[..., r:].unsqueeze(1), cos, sin)  # [B, 1, T, rope]
        cache = torch.cat([torch.cat([past_k, past_v], dim=-1), torch.cat([latent, k_pe], dim=-1)], dim=2)  # [B, 1, S, r + rope]
        w_uk, w_uv = self.absorbed_weights(q)
        q_lat = torch.matmul(q_nope, w_uk)  # [B, H, T, r]
        scores = torch.matmul(torch.cat([q_lat, q_pe], dim=-1), cache.transpose(2, 3)).float() * self.scale + mask  # [B, H, T, S]
        probs = torch.softmax(scores, dim=-1).to(cache.dtype)
        out = torch.matmul(torch.matmul(probs, cache[..., :r]), w_uv)  # [B, H, T, r] -> [B, H, T, v]
        out = out.transpose(1, 2).reshape(b, t, h * v)
        half = (r + rope) // 2
        return self.o_proj(out), cache[..., :half], cache[..., half:]

    def absorbed_weights(self, q) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's weight ([r, H (nope + v)], as MatMul takes it) -> W_UK [H, nope, r], W_UV [H, r, v].

        The head count is read from q's shape: a reshape whose shape is all constants would be folded
        by the exporter into a new initializer, and kv_b_proj.weight (which onnx_export.rewrite points
        at the int4 weights) would vanish from the graph."""
        s = self.s
        w = self.kv_b_proj.weight
        w = w.reshape(w.shape[0], q.shape[1], s.qk_nope_head_dim + s.v_head_dim)  # [r, H, nope + v]
        return w[..., :s.qk_nope_head_dim].permute(1, 2, 0), w[..., s.qk_nope_head_dim:].transpose(0, 1)


def absorb(decoder):
    """An mla.MLADecoder with every layer's attention in the absorbed form (same modules, same weights)."""
    for layer in decoder.model.layers:
        a = layer.self_attn
        layer.self_attn = AbsorbedMLAttention(a.s, {n: m for n, m in a.named_children() if not n.endswith("layernorm")},
                                              {n: m for n, m in a.named_children() if n.endswith("layernorm")}, a.scale)
    return decoder
