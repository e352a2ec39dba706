"""DeepSeek-V2 / V3 conversion one decoder layer at a time, for checkpoints above
deepseek_v2.WHOLE_MODEL_PARAMS: the dense path's pieces (streaming.py, workdir.py, layer_check.py,
streamed_eval.py) with an MLA layer in place of the dense one.

quantize: into the work directory (resumable: a rerun goes on from the first missing layer with the
same bytes), RTN of each layer's linears (every routed expert one tensor at a time), or GPTQ by
deepseek_v2_gptq.LayerGPTQ (the whole-model path's per-layer step), the calibration activations
carried from layer to layer through the work directory · export: the weights file of
deepseek_v2.write_weights, byte for byte, written layer by layer (each MoE layer's stacked experts
one expert at a time) · verify: head, each layer
and tail of the graph against PyTorch (layer_check) · accuracy: streamed float and int4 models.
Peak memory: one decoder layer in fp32 (an MoE layer's experts stacked once), never the whole model;
with GPTQ also the calibration activations and one subset's GPTQ tasks (their fp32 Hessians within
deepseek_v2_gptq.HESSIAN_BYTES).
"""

from __future__ import annotations

import functools

import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from . import accuracy
from .checkpoint import TOKENIZER_FILES
from .decoder import Linear, RMSNorm
from .deepseek_v2 import CORRECTION_BIAS, interleaved, is_quantized, layer_names, package, pack_uint4_chunks, refuse_early
from .layerwise import from_result, layer_result
from .mla import (MLADecoder, MLALayer, DenseMLP, MoE, Router, Stacked, attention_linears, attention_norms, attention_scale,
                  interleave, rope_tables, stub_weights)
from .quant import rtn
from .streamed_eval import StreamedModel
from .streaming import StreamWriter, _add_quant, _half_chunks, lm_head_rtn, rows_per_chunk, work_identity
from .tensors import embedding_rows
from .workdir import WorkDir, default_work_dir, maybe_kill, remove_work_dir


def quantize_layers(src, shape, opts, work: WorkDir, on_layer) -> dict[int, float]:
    """RTN of every layer not yet in the work directory; {layer: seconds} of those done now."""
    seconds = {}
    start = work.first_missing_layer(shape.num_layers)
    for i in range(start):
        on_layer(i, None)
    for i in range(start, shape.num_layers):
        t = time.perf_counter()
        q = {n.removesuffix(".weight"): rtn(src.get(n).float(), opts.group_size) for n in layer_names(shape, i) if is_quantized(n)}
        work.save("layer", i, layer_result(q))
        del q
        seconds[i] = round(time.perf_counter() - t, 3)
        on_layer(i, seconds[i])
        maybe_kill(i)
    return seconds


def gptq_layers(src, shape, arch, opts, work: WorkDir, on_layer, cfg: dict, routing: dict, calib) -> dict[int, float]:
    """GPTQ of every layer not yet in the work directory, as deepseek_v2_gptq.gptq_mla quantizes it
    (the same LayerGPTQ step on the same inputs: the same integers); {layer: seconds} of those done now.
    After layer i: acts-i (layer i+1's inputs), then layer-i (its integers, scales and GPTQ statistics);
    acts-(i-1) is dropped. A finished layer whose next-layer inputs are lost is redone."""
    from .deepseek_v2_gptq import LayerGPTQ, float_layer, quiet_stdout

    n, seconds = shape.num_layers, {}
    start = work.first_missing_layer(n)
    acts = None
    while 0 < start < n and (acts := work.load("acts", start - 1)) is None:
        work.drop("layer", start - 1)
        start -= 1
    for i in range(start):
        on_layer(i, None)
    if start == n:
        return seconds
    with quiet_stdout():
        run = LayerGPTQ(cfg, shape, calib.ids, opts)
        if start == 0:
            shp = (shape.vocab_size, shape.hidden_size)
            ids = torch.cat([w[0] for w in run.cal.ids])
            xs = run.inputs(embedding_rows(src, arch.embed, shp, ids, rows_per_chunk(shape.hidden_size)))
        else:
            xs = [acts[str(k)] for k in range(len(acts))]
        del acts
        for i in range(start, n):
            t = time.perf_counter()
            layer = float_layer(lambda name: src.get(name).float(), shape, i, routing, run.cal.scale)
            q, stats, xs = run.layer(i, layer, xs)
            del layer
            if i < n - 1:
                work.save("acts", i, {str(k): x for k, x in enumerate(xs)})
            work.save("layer", i, layer_result(q) | _stats_tensors(shape, i, stats))
            if i > 0:
                work.drop("acts", i - 1)
            del q
            seconds[i] = round(time.perf_counter() - t, 3)
            on_layer(i, seconds[i])
            maybe_kill(i)
    return seconds


STATS = "gptq."  # the GPTQ statistics' keys in a layer result, beside the integers and scales


def _stats_tensors(shape, i: int, stats: dict) -> dict[str, torch.Tensor]:
    """rtn_fallback as one flag per linear of the layer (in deepseek_v2_gptq.subsets order), expert_tokens as is."""
    from .deepseek_v2_gptq import subsets

    fallback = set(stats["rtn_fallback"])
    out = {f"{STATS}rtn_fallback": torch.tensor([f"model.layers.{i}.{n}" in fallback for n in sum(subsets(shape, i), [])],
                                                dtype=torch.uint8)}
    if "expert_tokens" in stats:
        out[f"{STATS}expert_tokens"] = torch.tensor(stats["expert_tokens"], dtype=torch.int64)
    return out


def gptq_stats(shape, work: WorkDir) -> dict:
    """deepseek_v2_gptq.gptq_mla's statistics, read back from every layer result."""
    from .deepseek_v2_gptq import subsets

    counts, fallback = {}, []
    for i in range(shape.num_layers):
        r = work.load("layer", i)
        names = [f"model.layers.{i}.{n}" for n in sum(subsets(shape, i), [])]
        fallback += [m for m, f in zip(names, r[f"{STATS}rtn_fallback"].tolist()) if f]
        if f"{STATS}expert_tokens" in r:
            counts[i] = r[f"{STATS}expert_tokens"].tolist()
    return {"expert_tokens": counts, "rtn_fallback": fallback}


def layer_quantized(work: WorkDir, i: int, group_size: int) -> dict:
    """{module: QuantizedLinear} of layer i's result (its GPTQ statistics left aside)."""
    return from_result({k: v for k, v in work.load("layer", i).items() if not k.startswith(STATS)}, group_size)


def write_weights_streamed(path: Path, src, work: WorkDir, shape, arch, opts, lm_head=None) -> tuple[dict, set, dict]:
    """deepseek_v2.write_weights' file, one layer's int4 results in memory at a time."""
    w, fp16, groups = StreamWriter(path), set(), {}
    g = opts.group_size

    def half(name, shp=None, transpose=False, source=None):
        shp = shp or src.shape(source or name)
        fp16.add(name)
        w.add(name, "float16", tuple(reversed(shp)) if transpose else tuple(shp), _half_chunks(src, source or name, tuple(shp), transpose))

    def stacked(module, qls):
        """qls: one QuantizedLinear per expert (an iterator read twice: integers, then scales)."""
        first = qls(0)
        e = shape.n_routed_experts
        w.add(f"{module}.qweight", "uint8", (e, first.q.shape[0], first.q.shape[1] // 2),
              (c for j in range(e) for c in pack_uint4_chunks(qls(j).q[None])))
        w.add(f"{module}.scales", "float16", (e, *first.scales.shape), (qls(j).scales.contiguous().numpy().tobytes() for j in range(e)))
        groups[module] = SimpleNamespace(group_size=g, stacked=True)

    half(arch.embed)
    for i in range(shape.num_layers):
        q = layer_quantized(work, i, g)
        for n in layer_names(shape, i):
            m = n.removesuffix(".weight")
            if ".mlp.experts." in m:
                if m.endswith(".experts.0.gate_proj"):
                    p = m.removesuffix(".0.gate_proj")
                    stacked(f"{p}.gate_up_proj", lambda j: interleaved(q[f"{p}.{j}.gate_proj"], q[f"{p}.{j}.up_proj"]))
                    stacked(f"{p}.down_proj", lambda j: q[f"{p}.{j}.down_proj"])
            elif m in q:
                _add_quant(w, m, q[m])
                groups[m] = SimpleNamespace(group_size=g)
            elif n.endswith(CORRECTION_BIAS):
                w.add(n, "float32", src.shape(n), [src.get(n).float().contiguous().numpy().tobytes()])
            elif n.endswith(".mlp.gate.weight"):  # the router feeds MatMul as [hidden, experts]
                half(n, transpose=True)
            else:
                half(n)
        del q
    half(arch.final_norm)
    if opts.lm_head_dtype == "int4":
        _add_quant(w, "lm_head", lm_head() if lm_head else lm_head_rtn(src, arch, shape, g))
        groups["lm_head"] = SimpleNamespace(group_size=g)
    else:
        source = arch.lm_head if arch.lm_head in src else arch.embed
        half(arch.lm_head, src.shape(source), transpose=True, source=source)
    return w.close(), fp16, groups


class MLAStreamedModel(StreamedModel):
    """streamed_eval.StreamedModel with mla.MLALayer layers, MLA's rotary tables and latent cache."""

    def __init__(self, kind, src, work, shape, arch, opts, inv_freq, rope_scale, routing, scale, lm_head_q=None):
        super().__init__(kind, src, work, shape, arch, opts, inv_freq, rope_scale, lm_head_q)
        self.routing, self.scale = routing, scale
        self.cache_dims = (1, (shape.kv_lora_rank + shape.qk_rope_head_dim) // 2)  # layer_check's past: [B, 1, S, half]

    def layer(self, i: int) -> MLALayer:
        s = self.s
        q = layer_quantized(self.work, i, self.opts.group_size) if self.kind == "quant" else {}

        def w(name):  # fp32: what the bundle stores (kind "quant") or the source
            m = name.removesuffix(".weight")
            if m in q:
                return q.pop(m).dequantize()
            return self.src.get(name).float() if self.kind == "float" or name.endswith(CORRECTION_BIAS) else self._t(name, None)

        def linear(name):
            return Linear(w(f"{name}.weight").t().contiguous(), None)

        p = f"model.layers.{i}"
        attn = MLADecoder.attention_class()(s, {n: linear(f"{p}.self_attn.{n}") for n in attention_linears(s)},
                                            {n: RMSNorm(w(f"{p}.self_attn.{n}.weight"), s.rms_norm_eps) for n in attention_norms(s)},
                                            self.scale)
        if s.is_moe_layer(i):
            mlp = moe(s, f"{p}.mlp", w, self.routing, linear)
        else:
            mlp = DenseMLP({n: linear(f"{p}.mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj")})
        return MLALayer(s, attn, mlp, (w(f"{p}.input_layernorm.weight"), w(f"{p}.post_attention_layernorm.weight"))).eval()

    def window_inputs(self, ids: torch.Tensor):
        t = ids.shape[1]
        cos, sin, mask = self.head_inputs(ids, torch.ones_like(ids), torch.arange(t).unsqueeze(0))[1:]
        return cos, sin, mask, torch.zeros(ids.shape[0], *self.cache_dims[:1], 0, self.cache_dims[1])

    def head_inputs(self, ids, mask, pos):
        """MLADecoder.forward's preamble: (embedding rows, cos, sin [B, 1, T, rope / 2], mask)."""
        t, total = ids.shape[1], mask.shape[1]
        freqs = pos.float().unsqueeze(-1) * self.inv_freq
        cos, sin = (freqs.cos() * self.rope_scale).unsqueeze(1), (freqs.sin() * self.rope_scale).unsqueeze(1)
        q_pos = torch.arange(t).unsqueeze(-1) + (total - t)
        allowed = (torch.arange(total).unsqueeze(0) <= q_pos).unsqueeze(0).unsqueeze(0) & mask.bool().unsqueeze(1).unsqueeze(1)
        return self.embed(ids), cos, sin, torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def moe(s, p: str, w, routing: dict, linear) -> MoE:
    """mla.MoE of one layer with the routed experts written straight into their stacks (one copy in
    fp32, not two): gate_up [E, 2I, H] interleaved, down [E, H, I]."""
    e, inter, h = s.n_routed_experts, s.moe_intermediate_size, s.hidden_size
    gate_up, down = torch.empty(e, 2 * inter, h), torch.empty(e, h, inter)
    for j in range(e):
        x = f"{p}.experts.{j}"
        gate_up[j] = interleave(w(f"{x}.gate_proj.weight")[None], w(f"{x}.up_proj.weight")[None])[0]
        down[j] = w(f"{x}.down_proj.weight")
    m = MoE.__new__(MoE)
    nn.Module.__init__(m)
    bias = w(f"{p}.gate.{CORRECTION_BIAS}") if s.router_bias else None
    m.gate = Router(w(f"{p}.gate.weight").t().contiguous(), s, routing, bias)
    m.experts = nn.Module()
    m.experts.gate_up_proj, m.experts.down_proj = Stacked(gate_up), Stacked(down)
    m.shared_experts = DenseMLP({n: linear(f"{p}.shared_experts.{n}") for n in ("gate_proj", "up_proj", "down_proj")}) \
        if s.n_shared_experts else None
    return m


def run(ck, shape, output, opts, stages, *, src, tk, calib, eval_tokens, bos, **_) -> tuple[dict, dict, dict]:
    """-> (manifest, report, extra summary), as deepseek_v2.run. Writes the bundle at `output`."""
    from edge_sdk.bundle import staged_directory
    from edge_sdk.fsutil import fsync_path

    from .layer_check import check_layers
    from .pipeline import export_graphs
    from .streamed_convert import LayerBar
    from .streamed_eval import nll

    r = refuse_early(ck, shape, opts, src)
    inv_freq, rope_scale = rope_tables(ck.config)
    scale = attention_scale(ck.config, shape)
    work_path = Path(opts.work_dir) if opts.work_dir else default_work_dir(output)
    work = WorkDir(work_path, work_identity(ck, opts, calib))
    with stages("quantize"):
        bar = LayerBar(stages, shape.num_layers)
        if opts.method == "gptq":
            seconds = gptq_layers(src, shape, ck.arch, opts, work, bar, ck.config, r, calib)
        else:
            seconds = quantize_layers(src, shape, opts, work, bar)
    with staged_directory(output, overwrite=opts.overwrite) as tmp:
        with stages("export"):
            lm_head = functools.cache(lambda: lm_head_rtn(src, ck.arch, shape, opts.group_size))  # written, then verified
            wsec, fp16_names, groups = write_weights_streamed(tmp / "model.weights", src, work, shape, ck.arch, opts, lm_head)
            fsync_path(tmp / "model.weights")
            small, stub = stub_weights(shape)
            graphs = export_graphs(tmp, ["fp32"], lambda _dtype: MLADecoder(small, stub, r, inv_freq, rope_scale, scale).eval(),
                                   shape, groups, fp16_names, wsec)
            for f in TOKENIZER_FILES:
                (tmp / f).write_bytes((ck.path / f).read_bytes())
        lm_q = lm_head() if opts.lm_head_dtype == "int4" else None

        def model(kind):
            return MLAStreamedModel(kind, src, work, shape, ck.arch, opts, inv_freq, rope_scale, r, scale, lm_q if kind == "quant" else None)

        report: dict = {}
        if opts.method == "gptq":
            from .deepseek_v2_gptq import summary

            report["gptq"] = summary(gptq_stats(shape, work))
        if opts.verify:
            with stages("verify"):
                report["onnx_vs_torch"] = check_layers(tmp / graphs["fp32"]["file"], model("quant"), shape, calib.ids, seed=opts.seed)
        with stages("accuracy"):
            quant_nll = nll(model("quant"), eval_tokens[: opts.eval_tokens], bos)
            report |= accuracy.report(nll(model("float"), eval_tokens[: opts.eval_tokens], bos), quant_nll)
        accuracy.settle(report, opts)
        with stages("package"):
            manifest = package(tmp, ck, shape, opts, calib, tk, graphs, wsec, report, r)
    if not opts.keep_work:
        remove_work_dir(work_path)
    return manifest, report, {"weights": wsec, "routing": r, "work_dir": str(work_path), "layer_seconds": seconds}
