"""MLA attention on onnxruntime's CPU provider: the expanded form (converters/mla.py: keys and values
rebuilt from the whole cached latent through kv_b_proj at every step) against the absorbed form
(converters/mla_absorbed.py: kv_b_proj folded into the query and the output), one attention block
at the DeepSeek-V2-Lite shape (hidden 2048, 16 heads, kv_lora_rank 512, rope 64, nope 128, v 128,
q_lora_rank none), every projection int4 g128 as the bundle stores it (DequantizeLinear -> MatMul,
which onnxruntime fuses to MatMulNBits where it can).

Forms timed:
  expanded          the converter's graph today
  absorbed          kv_b_proj int4 as stored, dequantized inside the graph at every step
  absorbed-fp32w    kv_b_proj dequantized once at load (an fp32 initializer): the cost of the step
                    without the per-step dequantization, at 8x kv_b_proj's int4 bytes

Each case: decode of one token at past lengths 128..4096, and a prefill of 512 tokens. The per-run
figure (median of timed runs) is checked against the wall time of the whole loop and against
onnxruntime's own profile of the same runs.

    python benchmarks/bench_mla.py [--threads 1] [--runs 20] [--accuracy-level 4] [--past 128 512 2048 4096] [--prefill 512] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

PAST = (128, 512, 2048, 4096)
PREFILL = 512
V2_LITE = dict(hidden_size=2048, num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64,
               qk_nope_head_dim=128, v_head_dim=128, q_lora_rank=None)
FORMS = ("expanded", "absorbed", "absorbed-fp32w")
GROUP = 128


def shape():
    from edge_sdk.converters.tiny import tiny_config
    from edge_sdk.modelspec import shape_from_config

    return replace(shape_from_config(tiny_config("deepseek_v2", 1024, **V2_LITE, num_key_value_heads=16)), num_layers=1)


def attention(s, absorbed: bool, seed: int = 0):
    """One MLAttention (or AbsorbedMLAttention) with random weights [in, out] at scale 1/sqrt(in)."""
    import torch

    from edge_sdk.converters.decoder import Linear, RMSNorm
    from edge_sdk.converters.mla import MLAttention, attention_linears
    from edge_sdk.converters.mla_absorbed import AbsorbedMLAttention

    g = torch.Generator().manual_seed(seed)
    dims = {"q_proj": (s.hidden_size, s.num_heads * (s.qk_nope_head_dim + s.qk_rope_head_dim)),
            "kv_a_proj_with_mqa": (s.hidden_size, s.kv_lora_rank + s.qk_rope_head_dim),
            "kv_b_proj": (s.kv_lora_rank, s.num_heads * (s.qk_nope_head_dim + s.v_head_dim)),
            "o_proj": (s.num_heads * s.v_head_dim, s.hidden_size)}
    lin = {n: Linear(torch.randn(*dims[n], generator=g) / dims[n][0] ** 0.5, None) for n in attention_linears(s)}
    norms = {"kv_a_layernorm": RMSNorm(1 + 0.1 * torch.randn(s.kv_lora_rank, generator=g), s.rms_norm_eps)}
    cls = AbsorbedMLAttention if absorbed else MLAttention
    return cls(s, lin, norms, (s.qk_nope_head_dim + s.qk_rope_head_dim) ** -0.5).eval()


def export(attn, s, path: Path, int4: set[str], at_load: set[str] = frozenset()) -> None:
    """Trace the block (x, cos, sin, mask, past_k, past_v) -> (out, present_k, present_v), then replace
    the float weight of every linear in `int4` by int4 + fp16 scales -> DequantizeLinear, as the bundle,
    and of every linear in `at_load` by the same int4 weight dequantized (fp32 q * scale)."""
    import io
    import warnings

    import onnx
    import torch

    half = (s.kv_lora_rank + s.qk_rope_head_dim) // 2
    args = (torch.randn(1, 3, s.hidden_size), torch.randn(1, 1, 3, s.qk_rope_head_dim // 2), torch.randn(1, 1, 3, s.qk_rope_head_dim // 2),
            torch.zeros(1, 1, 3, 5), torch.randn(1, 1, 2, half), torch.randn(1, 1, 2, half))
    names = ["x", "cos", "sin", "mask", "past_k", "past_v"]
    dyn = {"x": {1: "t"}, "cos": {2: "t"}, "sin": {2: "t"}, "mask": {2: "t", 3: "s"}, "past_k": {2: "p"}, "past_v": {2: "p"},
           "out": {1: "t"}, "present_k": {2: "s"}, "present_v": {2: "s"}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(attn, args, buf, input_names=names, output_names=["out", "present_k", "present_v"], dynamic_axes=dyn,
                          opset_version=18, dynamo=False, external_data=False, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    to_int4(model, {f"{n}.weight" for n in int4}, {f"{n}.weight" for n in at_load})
    onnx.save(model, path)


def to_int4(model, names: set[str], at_load: set[str]) -> None:
    """Round-to-nearest int4 (converters.quant.rtn) of each named [in, out] initializer, fed to its old
    users through Cast(fp16 scales -> fp32) and DequantizeLinear(axis 0, block 128): the bundle's form."""
    import numpy as np
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from edge_sdk.converters.quant import rtn

    g = model.graph
    found, keep, nodes = set(), [], []
    for init in g.initializer:
        if init.name not in names | at_load:
            keep.append(init)
            continue
        found.add(init.name)
        ql = rtn(torch.from_numpy(numpy_helper.to_array(init).copy()).t().contiguous(), GROUP)  # [out, in]
        if init.name in at_load:
            keep.append(numpy_helper.from_array(ql.dequantize().t().contiguous().numpy(), init.name))
            continue
        q = helper.make_tensor(f"{init.name}.q", TensorProto.INT4, ql.q.t().shape, ql.q.t().contiguous().numpy().astype(np.int8).ravel())
        keep += [q, numpy_helper.from_array(ql.scales.t().contiguous().numpy(), f"{init.name}.scales")]
        nodes += [helper.make_node("Cast", [f"{init.name}.scales"], [f"{init.name}.scales32"], to=TensorProto.FLOAT),
                  helper.make_node("DequantizeLinear", [q.name, f"{init.name}.scales32"], [f"{init.name}.dq"], axis=0, block_size=GROUP)]
    assert found == names | at_load, names | at_load - found  # each int4 weight must still be an initializer after the export's folding
    for n in g.node:
        n.input[:] = [f"{x}.dq" if x in names else x for x in n.input]
    nodes += list(g.node)
    del g.initializer[:], g.node[:]
    g.initializer.extend(keep)
    g.node.extend(nodes)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", 21)])
    model.ir_version = 10


def session(path: Path, threads: int, level: int, profile: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    so.enable_profiling = profile
    so.profile_file_prefix = str(path.parent / "ort_profile")  # beside the graphs, removed with them
    so.log_severity_level = 3
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(s, t: int, past: int, seed: int = 0) -> dict:
    """Inputs of one step: t new tokens after `past` cached ones, causal mask, batch 1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    half = (s.kv_lora_rank + s.qk_rope_head_dim) // 2
    ang = rng.random((1, 1, t, s.qk_rope_head_dim // 2), dtype=np.float32) * 6.28
    q_pos, k_pos = np.arange(t)[:, None] + past, np.arange(past + t)[None, :]
    mask = np.where(k_pos <= q_pos, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]
    return {"x": rng.standard_normal((1, t, s.hidden_size), dtype=np.float32), "cos": np.cos(ang), "sin": np.sin(ang), "mask": mask,
            "past_k": rng.standard_normal((1, 1, past, half), dtype=np.float32), "past_v": rng.standard_normal((1, 1, past, half), dtype=np.float32)}


def time_case(sess, f: dict, runs: int) -> dict:
    """Median per-run ms, and the whole loop's wall time / runs as an independent figure."""
    for _ in range(3):
        sess.run(None, f)
    per = []
    start = time.perf_counter()
    for _ in range(runs):
        a = time.perf_counter()
        sess.run(None, f)
        per.append(time.perf_counter() - a)
    loop = time.perf_counter() - start
    return {"median_ms": 1e3 * statistics.median(per), "min_ms": 1e3 * min(per), "loop_mean_ms": 1e3 * loop / runs}


def profiled_ms(path: Path, f: dict, runs: int, threads: int, level: int) -> float:
    """Median model_run duration in onnxruntime's own profile of `runs` runs (after 3 warm-ups)."""
    sess = session(path, threads, level, profile=True)
    for _ in range(3 + runs):
        sess.run(None, f)
    trace = Path(sess.end_profiling())
    durs = [e["dur"] for e in json.loads(trace.read_text()) if e.get("name") == "model_run"][3:]  # us
    trace.unlink()
    return statistics.median(durs) / 1e3


def op_counts(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path.with_suffix(".opt.onnx")))
    out: dict = {}
    for n in m.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def agree(paths: dict, s, threads: int) -> dict:
    """Largest |out| difference of each form from the expanded one at past 128 (they hold the same int4 weights), at
    accuracy level 1: level 4 rounds MatMulNBits' activations to int8, which only the expanded form's
    kv_b_proj goes through."""
    import numpy as np

    f = feeds(s, 1, 128, seed=1)
    outs = {k: session(p, threads, 1).run(None, f)[0] for k, p in paths.items()}
    return {k: float(np.abs(o - outs["expanded"]).max()) for k, o in outs.items()} | {"max_abs_out": float(np.abs(outs["expanded"]).max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4))
    ap.add_argument("--past", type=int, nargs="+", default=list(PAST), help="decode past lengths")
    ap.add_argument("--prefill", type=int, nargs="+", default=[PREFILL], help="prefill lengths (from an empty cache)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    s = shape()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rows, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        all_lin = {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
        paths = {"expanded": Path(tmp) / "expanded.onnx", "absorbed": Path(tmp) / "absorbed.onnx", "absorbed-fp32w": Path(tmp) / "absorbed-fp32w.onnx"}
        export(attention(s, False), s, paths["expanded"], all_lin)
        export(attention(s, True), s, paths["absorbed"], all_lin)
        export(attention(s, True), s, paths["absorbed-fp32w"], all_lin - {"kv_b_proj"}, {"kv_b_proj"})
        sessions = {k: session(p, a.threads, a.accuracy_level) for k, p in paths.items()}
        ops = {k: op_counts(p) for k, p in paths.items()}
        diff = agree(paths, s, a.threads)
        cases = [("decode", 1, p) for p in a.past] + [("prefill", n, 0) for n in a.prefill]
        for kind, t, past in cases:
            f = feeds(s, t, past)
            row = {"case": kind, "tokens": t, "past": past}
            for k, sess in sessions.items():
                row[k] = time_case(sess, f, a.runs if kind == "decode" else max(3, a.runs // 4))
            rows.append(row)
        for k in FORMS:  # the independent check: onnxruntime's profile of the longest decode case
            f = feeds(s, 1, max(a.past))
            checks.append({"form": k, "past": max(a.past), "profiled_median_ms": profiled_ms(paths[k], f, a.runs, a.threads, a.accuracy_level)})
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    result = {"shape": V2_LITE, "threads": a.threads, "accuracy_level": a.accuracy_level, "runs": a.runs, "cpus": os.cpu_count(),
              "loadavg_before": load_before, "loadavg_after": load_after, "max_abs_out_diff": diff, "ops": ops, "rows": rows,
              "profile_check": checks, "crossover": crossover(rows)}
    print(json.dumps(result, indent=1) if a.json else table(result))
    return 0


def crossover(rows) -> str:
    """Where the absorbed decode stops (or starts) winning, from the decode rows."""
    wins = [(r["past"], r["absorbed"]["median_ms"] < r["expanded"]["median_ms"]) for r in rows if r["case"] == "decode"]
    if all(w for _, w in wins):
        return f"none in {wins[0][0]}..{wins[-1][0]}: absorbed faster at every past length"
    if not any(w for _, w in wins):
        return f"none in {wins[0][0]}..{wins[-1][0]}: expanded faster at every past length"
    first = next(p for p, w in wins if w)
    return f"absorbed faster from past {first}"


def table(r) -> str:
    lines = [f"MLA attention block, DeepSeek-V2-Lite shape, int4 g{GROUP}, onnxruntime CPU, {r['threads']} thread(s), "
             f"accuracy level {r['accuracy_level']}, loadavg {' '.join(r['loadavg_before'])} -> {' '.join(r['loadavg_after'])}",
             f"{'case':<8} {'past':>5} {'tokens':>6} | " + " | ".join(f"{k:>22}" for k in FORMS) + " | expanded/absorbed",
             f"{'':<8} {'':>5} {'':>6} | " + " | ".join(f"{'median (loop mean) ms':>22}" for _ in FORMS) + " |"]
    for row in r["rows"]:
        cells = " | ".join(f"{row[k]['median_ms']:>10.3f} ({row[k]['loop_mean_ms']:>8.3f})" for k in FORMS)
        lines.append(f"{row['case']:<8} {row['past']:>5} {row['tokens']:>6} | {cells} | {row['expanded']['median_ms'] / row['absorbed']['median_ms']:>6.2f}x")
    lines.append("onnxruntime profile (model_run median), decode at past " + str(r["profile_check"][0]["past"]) + ": "
                 + ", ".join(f"{c['form']} {c['profiled_median_ms']:.3f} ms" for c in r["profile_check"]))
    d = r["max_abs_out_diff"]
    lines.append(f"max |out - expanded's| at past 128, accuracy level 1 (max |out| {d['max_abs_out']:.2f}): "
                 + ", ".join(f"{k} {d[k]:.1e}" for k in FORMS[1:]))
    lines.append("crossover: " + r["crossover"])
    for k, ops in r["ops"].items():
        lines.append(f"ops after onnxruntime's optimisation, {k}: " + ", ".join(f"{o} {n}" for o, n in sorted(ops.items())))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
