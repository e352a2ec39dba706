"""Perplexity and top-1 predictions of the float and the int4 model, computed layer by layer.

Each held-out window goes through the same modules as decoder.Decoder.forward (same ops, same
order), but only one decoder layer exists at a time and the embedding / lm_head are read in row
chunks, so the numbers equal the whole-model computation while memory stays at one layer.
"""

from __future__ import annotations

import torch

from .archs import ATTN, MLP
from .decoder import Layer, Linear, RMSNorm
from .layerwise import from_result
from .streaming import rows_per_chunk
from .tensors import embedding_rows, expected_shapes


class StreamedModel:
    """kind "float": the source weights in fp32; kind "quant": what the bundle stores (q * scale, fp16)."""

    def __init__(self, kind, src, work, shape, arch, opts, inv_freq, rope_scale, lm_head_q=None):
        self.kind, self.src, self.work, self.s, self.arch, self.opts = kind, src, work, shape, arch, opts
        self.inv_freq, self.rope_scale, self.lm_head_q = inv_freq.float(), rope_scale, lm_head_q

    def _t(self, name, shp, rows=None):
        if name == self.arch.lm_head and name not in self.src:
            name = self.arch.embed
        t = self.src.get(name, shp, rows=rows)
        return t.to(torch.float32) if self.kind == "float" else t.half().float()

    def layer(self, i: int) -> Layer:
        exp = expected_shapes(self.s, self.arch, i)
        q = from_result(self.work.load("layer", i), self.opts.group_size) if self.kind == "quant" else None
        lin = {}
        for p in (*ATTN, *MLP):
            n = self.arch.linear(i, p)
            b = self._t(f"{n}.bias", exp[f"{n}.bias"]) if f"{n}.bias" in exp else None
            lin[p] = Linear(self._weight_t(n, exp[f"{n}.weight"], q.pop(n) if q is not None else None), b)
        norms = (self._t(self.arch.norm(i, "input_norm"), exp[self.arch.norm(i, "input_norm")]),
                 self._t(self.arch.norm(i, "post_attn_norm"), exp[self.arch.norm(i, "post_attn_norm")]))
        return Layer(self.s, norms, lin).eval()

    def _weight_t(self, name, shp, ql=None) -> torch.Tensor:
        """fp32 [in, out] of one linear, filled in row chunks of [out, in] (no full-size temporaries):
        the values of dequantize() / the source weight, transposed."""
        out, inp = shp
        w_t = torch.empty(inp, out, dtype=torch.float32)
        step = rows_per_chunk(inp)
        for a in range(0, out, step):
            if ql is not None:
                rows = ql.q[a:a + step].float() * ql.scales[a:a + step].float().repeat_interleave(ql.group_size, dim=1)
            else:
                rows = self._t(f"{name}.weight", shp, rows=slice(a, a + step))
            w_t[:, a:a + step] = rows.t()
        return w_t

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        shp = (self.s.vocab_size, self.s.hidden_size)
        rows = embedding_rows(self.src, self.arch.embed, shp, ids, rows_per_chunk(shp[1]))
        return rows.to(torch.float32) if self.kind == "float" else rows.half().float()

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """logits fp32 [B, T, vocab]: final norm, then lm_head in row chunks of the vocabulary."""
        v, h = self.s.vocab_size, self.s.hidden_size
        x = RMSNorm(self._t(self.arch.final_norm, (h,)), self.s.rms_norm_eps)(x)
        step = rows_per_chunk(h)
        out = []
        for a in range(0, v, step):
            if self.lm_head_q is not None:
                ql = self.lm_head_q
                w = ql.q[a:a + step].float() * ql.scales[a:a + step].float().repeat_interleave(ql.group_size, dim=1)
            else:
                w = self._t(self.arch.lm_head, (v, h), rows=slice(a, a + step))
            out.append(torch.matmul(x, w.t().contiguous()))
        return (out[0] if len(out) == 1 else torch.cat(out, dim=-1)).float()

    def window_inputs(self, ids: torch.Tensor):
        """cos, sin, mask and empty past exactly as Decoder.forward builds them (no padding, no past)."""
        t = ids.shape[1]
        pos = torch.arange(t).unsqueeze(0)
        freqs = pos.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.rope_scale).to(torch.float32).unsqueeze(1)
        sin = (emb.sin() * self.rope_scale).to(torch.float32).unsqueeze(1)
        q_pos = torch.arange(t).unsqueeze(-1)
        k_pos = torch.arange(t).unsqueeze(0)
        allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0) & torch.ones_like(ids).bool().unsqueeze(1).unsqueeze(1)
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        empty = torch.zeros(ids.shape[0], self.s.num_kv_heads, 0, self.s.head_dim)
        return cos, sin, mask, empty

    def logits(self, windows: list[torch.Tensor]):
        """Yield logits of every window; the decoder layers are built once each."""
        xs = [self.embed(ids) for ids in windows]
        ins = [self.window_inputs(ids) for ids in windows]
        with torch.no_grad():
            for i in range(self.s.num_layers):
                layer = self.layer(i)
                xs = [layer(x, c, s, m, e, e)[0] for x, (c, s, m, e) in zip(xs, ins)]
                del layer
            for x in xs:
                yield self.head(x)


def nll(model: StreamedModel, tokens: list[int], bos: int | None, window: int = 512):
    """accuracy.nll, streamed: per-token NLL and argmax predictions over `tokens`."""
    from edge_sdk.errors import ConversionError

    if len(tokens) < 8:
        raise ConversionError(f"held-out text has only {len(tokens)} tokens", hint="pass a longer --eval-text")
    windows = []
    for start in range(0, len(tokens) - 1, window - 1):
        chunk = tokens[start: start + window]
        if len(chunk) < 2:
            break
        windows.append(torch.tensor([([bos] if bos is not None else []) + chunk]))
    nlls, preds = [], []
    off = 1 if bos is not None else 0
    for ids, logits in zip(windows, model.logits(windows)):
        logits = logits[0].float()
        lp = torch.log_softmax(logits[off:-1], -1)
        target = ids[0, off + 1:]
        nlls.append(-lp.gather(-1, target.unsqueeze(-1)).squeeze(-1))
        preds.append(logits[off:-1].argmax(-1))
    return torch.cat(nlls), torch.cat(preds)
