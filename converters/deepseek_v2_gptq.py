"""GPTQ int4 for DeepSeek-V2 / V3 (MLA + MoE), one decoder layer at a time, with GPTQModel's per-module
GPTQ step (layerwise.gptq_task / run_task) driven as GPTQModel 7.6's layer loop drives it:
  - layer inputs: the embedding rows of each calibration window (fp32), causal, rope positions 0..T-1;
    the layer is mla.py's float MLALayer in its expanded form (kv_b_proj applied to the latent as a linear)
    with nn.Linear modules named as the checkpoint names them;
  - four subsets in GPTQModel's DeepSeek-V2 order: the attention input projections (q_proj or
    q_a_proj / q_b_proj, kv_a_proj_with_mqa, kv_b_proj), o_proj, every gate/up (dense MLP, each routed
    expert, the shared experts), every down_proj. Each subset: forward every window through the layer
    with hooks feeding each module's input to its GPTQ task, quantize, put the weights back in the layer;
    the next subset sees the earlier subsets quantized;
  - a routed expert is computed (and calibrated) only on the tokens the router sends to it; one that
    gets fewer tokens than GPTQModel's low-sample threshold (0.5 % of the calibration's, so any expert
    that gets none) is round-to-nearest, counted;
  - the router (gate; V3's correction bias) stays float and is not quantized;
  - as GPTQModel's GPTQ processor (fwd_replay_after_process), the next layer's inputs are a replay of
    the layer with every linear quantized. The weights put back are the stored ones (int4 * fp16 scale),
    which differ from GPTQModel's wq only by the scales' fp16 rounding: the replay is what the bundle computes.
LayerGPTQ.layer is that step for one layer; gptq_mla runs it over the whole float model (the path below
deepseek_v2.WHOLE_MODEL_PARAMS), deepseek_v2_streamed over one layer read from the checkpoint at a time.
Memory: the float model (gptq_mla: whole; streamed: one layer), one subset's GPTQ tasks (their Hessians
within HESSIAN_BYTES, the expert subsets cut to fit), the activations twice.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from .decoder import RMSNorm
from .layerwise import _gptqmodel, gptq_task, quantize_config, run_task
from .mla import DenseMLP, MLALayer, MLAttention, Router, attention_linears, attention_norms, attention_scale, rope_tables
from .quant import QuantizedLinear, rtn

PROJ = ("gate_proj", "up_proj", "down_proj")


class CountingMoE(nn.Module):
    """Shared experts plus each token's top-k routed experts, every expert run on its own tokens only
    (so a hook on its linears sees exactly those); `counts[e]` adds up the tokens expert e received."""

    def __init__(self, router: Router, experts: list[DenseMLP], shared: DenseMLP | None):
        super().__init__()
        self.gate, self.experts, self.shared_experts = router, nn.ModuleList(experts), shared
        self.counts = torch.zeros(len(experts), dtype=torch.long)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])  # [N, H]
        w = self.gate(flat).to(x.dtype)  # [N, E], 0 outside each token's top-k
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(w[:, e] > 0).flatten()
            self.counts[e] += rows.numel()
            if rows.numel():
                out = out.index_add(0, rows, expert(flat[rows].unsqueeze(0))[0] * w[rows, e:e + 1])
        out = out.reshape(x.shape)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


def float_layer(get, s, i: int, routing: dict, scale: float) -> MLALayer:
    """Layer i in fp32 with nn.Linear modules named as the checkpoint names them; get(name) -> one tensor."""
    p = f"model.layers.{i}"

    def linear(name):
        w = get(f"{name}.weight").float()
        m = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")  # no random init: the weight is replaced
        m.weight = nn.Parameter(w.clone(), requires_grad=False)
        return m

    def block(prefix):
        return DenseMLP({n: linear(f"{prefix}.{n}") for n in PROJ})

    attn = MLAttention(s, {n: linear(f"{p}.self_attn.{n}") for n in attention_linears(s)},
                       {n: RMSNorm(get(f"{p}.self_attn.{n}.weight").float(), s.rms_norm_eps) for n in attention_norms(s)}, scale)
    if s.is_moe_layer(i):
        bias = get(f"{p}.mlp.gate.e_score_correction_bias") if s.router_bias else None
        mlp = CountingMoE(Router(get(f"{p}.mlp.gate.weight").float().t().contiguous(), s, routing, bias),
                          [block(f"{p}.mlp.experts.{e}") for e in range(s.n_routed_experts)],
                          block(f"{p}.mlp.shared_experts") if s.n_shared_experts else None)
    else:
        mlp = block(f"{p}.mlp")
    norms = (get(f"{p}.input_layernorm.weight").float(), get(f"{p}.post_attention_layernorm.weight").float())
    return MLALayer(s, attn, mlp, norms).eval()


HESSIAN_BYTES = 2**30  # GPTQ tasks held at once: an fp32 [in, in] Hessian per linear (V2-Lite: 16.8 MB per expert gate)


def subsets(s, i: int) -> list[list[str]]:
    """Module names relative to the layer, in GPTQModel's order for DeepSeek-V2. An MoE layer's gate/up and
    down subsets are cut between experts into pieces whose Hessians fit HESSIAN_BYTES, each piece its own
    forward: the same integers (an expert's inputs never depend on another expert's weights)."""
    attn = [f"self_attn.{n}" for n in attention_linears(s)]
    if not s.is_moe_layer(i):
        blocks = [("mlp", s.intermediate_size)]
    else:
        blocks = [(f"mlp.experts.{e}", s.moe_intermediate_size) for e in range(s.n_routed_experts)]
        blocks += [("mlp.shared_experts", s.moe_intermediate_size * s.n_shared_experts)] if s.n_shared_experts else []
    gate_up = _pieces([[f"{b}.{n}" for n in PROJ[:2]] for b, _ in blocks], [2 * 4 * s.hidden_size ** 2] * len(blocks))
    down = _pieces([[f"{b}.down_proj"] for b, _ in blocks], [4 * d ** 2 for _, d in blocks])
    return [attn[:-1], attn[-1:], *gate_up, *down]


def _pieces(groups: list[list[str]], nbytes: list[int]) -> list[list[str]]:
    out, size = [[]], 0
    for g, b in zip(groups, nbytes):
        if out[-1] and size + b > HESSIAN_BYTES:
            out.append([])
            size = 0
        out[-1] += g
        size += b
    return out


class Calibration:
    """The calibration windows' rope tables and causal masks, and the layer loop."""

    def __init__(self, cfg: dict, s, ids: list[list[int]]):
        inv_freq, rope_scale = rope_tables(cfg)
        self.s, self.ids, self.scale = s, [torch.tensor([w]) for w in ids], attention_scale(cfg, s)
        self.total_tokens = sum(len(w) for w in ids)
        half = (s.kv_lora_rank + s.qk_rope_head_dim) // 2
        self.empty = torch.zeros(1, 1, 0, half)
        self.kw = []
        for w in self.ids:
            t = w.shape[1]
            freqs = torch.arange(t).float().unsqueeze(-1) * inv_freq  # [T, rope / 2]
            cos, sin = (freqs.cos() * rope_scale)[None, None], (freqs.sin() * rope_scale)[None, None]  # [1, 1, T, rope / 2]
            mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]  # [1, 1, T, T]
            self.kw.append((cos, sin, mask))

    def forward(self, layer, xs):
        with torch.no_grad():
            return [layer(x, cos, sin, mask, self.empty, self.empty)[0] for x, (cos, sin, mask) in zip(xs, self.kw)]


class LayerGPTQ:
    """GPTQModel's settings and the calibration windows; quantizes one float layer at a time, the whole-model
    path (gptq_mla) and the streamed one (deepseek_v2_streamed) alike. Call inside quiet_stdout()."""

    def __init__(self, cfg: dict, s, calib_ids: list[list[int]], opts):
        gm = _gptqmodel()
        from gptqmodel.utils.fallback import should_use_fallback

        self.s, self.opts, self.qc, self.low_sample = s, opts, quantize_config(gm, opts), should_use_fallback
        self.cal = Calibration(cfg, s, calib_ids)

    def inputs(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Layer 0's inputs from the embedding rows of the windows' tokens, concatenated: fp32 [1, T, hidden] each."""
        return [x.float().unsqueeze(0) for x in rows.split([w.shape[1] for w in self.cal.ids])]

    def layer(self, i: int, layer: MLALayer, xs: list[torch.Tensor]) -> tuple[dict[str, QuantizedLinear], dict, list[torch.Tensor]]:
        """-> ({module: QuantizedLinear} of layer i, {"expert_tokens": [tokens per routed expert] (MoE layers),
        "rtn_fallback": [modules]}, the next layer's inputs: the layer replayed with its weights as stored)."""
        s, cal, g = self.s, self.cal, self.opts.group_size
        torch.manual_seed(self.opts.seed)  # per layer: a resumed run starts any layer as a whole run does
        quantized, fallback = {}, []
        for subset in subsets(s, i):
            mods = {n: layer.get_submodule(n) for n in subset}
            tasks = {n: gptq_task(self.qc, f"model.layers.{i}.{n}", m, cal.total_tokens) for n, m in mods.items()}
            hooks = [m.register_forward_hook(_feed(tasks[n])) for n, m in mods.items()]
            if s.is_moe_layer(i):
                layer.mlp.counts.zero_()
            try:
                cal.forward(layer, xs)
            finally:
                for h in hooks:
                    h.remove()
            for n, m in mods.items():
                name = f"model.layers.{i}.{n}"
                if self.low_sample(tasks[n].fallback, float(tasks[n].nsamples), cal.total_tokens):
                    tasks[n].free()
                    quantized[name] = rtn(m.weight.data, g)
                    fallback.append(name)
                else:
                    quantized[name], _wq = run_task(tasks[n], g)
                m.weight.data = quantized[name].dequantize()
        stats = {"rtn_fallback": fallback} | ({"expert_tokens": layer.mlp.counts.tolist()} if s.is_moe_layer(i) else {})
        return quantized, stats, cal.forward(layer, xs)


def quiet_stdout():
    """GPTQModel prints banners and logs on stdout; keep stdout for the CLI's --json."""
    return contextlib.redirect_stdout(sys.stderr)


def gptq_mla(weights: dict, s, cfg: dict, routing: dict, calib, opts) -> tuple[dict[str, QuantizedLinear], dict]:
    """-> ({module: QuantizedLinear} for every attention projection, dense MLP and expert linear,
    {"expert_tokens": {layer: [tokens per routed expert]}, "rtn_fallback": [modules]})."""
    with quiet_stdout():
        run = LayerGPTQ(cfg, s, calib.ids, opts)
        xs = run.inputs(weights["model.embed_tokens.weight"][torch.cat([w[0] for w in run.cal.ids])])
        quantized, counts, fallback = {}, {}, []
        for i in range(s.num_layers):
            q, stats, xs = run.layer(i, float_layer(weights.__getitem__, s, i, routing, run.cal.scale), xs)
            quantized |= q
            fallback += stats["rtn_fallback"]
            if "expert_tokens" in stats:
                counts[i] = stats["expert_tokens"]
    return quantized, {"expert_tokens": counts, "rtn_fallback": fallback}


def _feed(task):
    def hook(module, inp, out):
        task.add_batch(inp[0].data, out.data, batch_index=None)
    return hook


def summary(stats: dict) -> dict:
    """The accuracy report's lines on GPTQ's coverage of the routed experts."""
    experts = sorted({n.rsplit(".", 1)[0] for n in stats["rtn_fallback"] if ".mlp.experts." in n})
    return {"gptq_routed_experts": sum(len(c) for c in stats["expert_tokens"].values()) - len(experts),
            "rtn_fallback_experts": len(experts),
            "rtn_fallback_modules": stats["rtn_fallback"],
            "rtn_fallback_rule": "a routed expert that received fewer than 0.5% of the calibration tokens (GPTQModel's "
                                 "low-sample threshold) is round-to-nearest",
            "expert_tokens": {str(i): c for i, c in stats["expert_tokens"].items()}}
