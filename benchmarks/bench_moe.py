"""One DeepSeek-V2 MoE block (router, routed experts, shared experts) on onnxruntime's CPU provider,
with the bundle's int4 g128 weights, in two formulations side by side:

  all-experts   the previous graph: every routed expert dequantized (DequantizeLinear -> MatMul) and
                computed, weighted by its routing weight, zero outside the top-k
  qmoe          the converter's graph (converters/mla.py MoE): com.microsoft QMoE over the layer's
                experts stacked as stored (uint4, fp16 scales); a token reads and computes its top-k
  qmoe-acc4     the same node with accuracy_level 4 (int8 activations): not what the converter builds

at the tiny test shape and the DeepSeek-V2-Lite shape (hidden 2048, 64 routed + 2 shared experts,
6 active, moe_intermediate_size 1408). Both graphs are built by the converter's own code (mla.MoE,
onnx_export.rewrite, deepseek_v2's stacked layout) from the same int4 weights, so their outputs agree
to fp32 rounding (printed). Per case: ms per decode token (batch 1) and per prefill, the weight
bytes a decode token reads (router + shared experts + the routed experts it computes), and the
largest output difference from all-experts relative to the largest output.

    python benchmarks/bench_moe.py [--shape tiny v2-lite] [--threads 1] [--runs 20] [--prefill 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

GROUP = 128
SHAPES = {"tiny": {}, "v2-lite": dict(hidden_size=2048, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                                      moe_intermediate_size=1408)}
FORMS = ("all-experts", "qmoe", "qmoe-acc4")
STUB = 32  # hidden and intermediate size of the traced module; the rewrite points it at the real weights


def shape(name: str):
    from edge_sdk.converters.deepseek_v2 import routing
    from edge_sdk.converters.tiny import tiny_config
    from edge_sdk.modelspec import shape_from_config

    cfg = tiny_config("deepseek_v2", 1024, **SHAPES[name])
    return shape_from_config(cfg), routing(cfg)


class AllExperts:
    """The previous formulation, as a torch module factory (kept here only to measure against)."""

    @staticmethod
    def build(router, experts, shared):
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate, self.experts, self.shared_experts = router, nn.ModuleList(experts), shared

            def forward(self, x):
                w = self.gate(x).to(x.dtype)  # [B, T, E]
                out = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
                for e, expert in enumerate(self.experts):
                    out = out + expert(x) * w[..., e:e + 1]
                return out

        return Block()


def stub_block(s, r, old: bool):
    """The MoE block at hidden = intermediate = STUB with the real expert count, wrapped as `mlp`."""
    import torch
    from torch import nn

    from edge_sdk.converters.decoder import Linear
    from edge_sdk.converters.mla import DenseMLP, MoE, Router

    def mlp(inter):
        return DenseMLP({n: Linear(torch.randn(STUB, inter) if n != "down_proj" else torch.randn(inter, STUB), None)
                         for n in ("gate_proj", "up_proj", "down_proj")})

    router = Router(torch.randn(STUB, s.n_routed_experts), s, r)
    experts = [mlp(STUB) for _ in range(s.n_routed_experts)]
    shared = mlp(STUB) if s.n_shared_experts else None
    inner = AllExperts.build(router, experts, shared) if old else MoE(router, experts, shared)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = inner

        def forward(self, x):
            return self.mlp(x)

    return Wrap().eval()


def write_weights(path: Path, s, seed: int = 0):
    """Random weights at the real shape, round-to-nearest int4, stored as the bundle stores them: the
    routed experts both stacked (QMoE) and one by one (all-experts). -> (weights section, groups, fp16 names)."""
    from types import SimpleNamespace

    import torch

    from edge_sdk.converters.deepseek_v2 import interleaved, pack_uint4_chunks
    from edge_sdk.converters.quant import pack_int4_chunks, rtn
    from edge_sdk.converters.streaming import StreamWriter

    g = torch.Generator().manual_seed(seed)
    h, inter, e_n = s.hidden_size, s.moe_intermediate_size, s.n_routed_experts
    w, groups = StreamWriter(path), {}

    def rand(out, inp):
        return rtn(torch.randn(out, inp, generator=g) / inp ** 0.5, GROUP)

    def quant(module, ql):
        w.add(f"{module}.qweight", "int4", (ql.q.shape[1], ql.q.shape[0]), pack_int4_chunks(ql.q.t()))
        s_t = ql.scales.t().contiguous()
        w.add(f"{module}.scales", "float16", tuple(s_t.shape), [s_t.numpy().tobytes()])
        groups[module] = SimpleNamespace(group_size=GROUP)

    def stacked(module, qls):
        q, sc = torch.stack([ql.q for ql in qls]), torch.stack([ql.scales for ql in qls]).contiguous()
        w.add(f"{module}.qweight", "uint8", (*q.shape[:2], q.shape[2] // 2), pack_uint4_chunks(q))
        w.add(f"{module}.scales", "float16", tuple(sc.shape), [sc.numpy().tobytes()])
        groups[module] = SimpleNamespace(group_size=GROUP, stacked=True)

    gate = (torch.randn(h, e_n, generator=g) / h ** 0.5).half()
    w.add("mlp.gate.weight", "float16", tuple(gate.shape), [gate.numpy().tobytes()])
    si = inter * s.n_shared_experts
    for p, (o, i) in {"gate_proj": (si, h), "up_proj": (si, h), "down_proj": (h, si)}.items():
        quant(f"mlp.shared_experts.{p}", rand(o, i))
    experts = [{"gate_proj": rand(inter, h), "up_proj": rand(inter, h), "down_proj": rand(h, inter)} for _ in range(e_n)]
    for e, x in enumerate(experts):
        for p, ql in x.items():
            quant(f"mlp.experts.{e}.{p}", ql)
    stacked("mlp.experts.gate_up_proj", [interleaved(x["gate_proj"], x["up_proj"]) for x in experts])
    stacked("mlp.experts.down_proj", [x["down_proj"] for x in experts])
    return w.close(), groups, {"mlp.gate.weight"}


def export(s, r, old: bool, path: Path, wsec, groups, fp16) -> None:
    import io
    import warnings

    import onnx
    import torch

    from edge_sdk.converters import onnx_export

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(stub_block(s, r, old), (torch.randn(1, 3, STUB),), buf, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "b", 1: "t"}, "logits": {0: "b", 1: "t"}}, opset_version=onnx_export.EXPORT_OPSET,
                          dynamo=False, external_data=False, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    onnx_export.rewrite(model, groups, fp16, "float32", wsec, wsec["file"], s.hidden_size)  # "logits" is [B, T, hidden] here
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = s.hidden_size
    onnx_export.save(model, path)


def with_accuracy_level(src: Path, dst: Path, level: int) -> None:
    import onnx

    m = onnx.load(str(src), load_external_data=False)
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "QMoE" and a.name == "accuracy_level":
                a.i = level
    dst.write_bytes(m.SerializeToString())


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # the tests' level: fp32 activations
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_runs(sess, x, runs: int) -> float:
    """Median ms of `runs` runs after 3 warm-ups."""
    for _ in range(3):
        sess.run(None, {"x": x})
    per = []
    for _ in range(runs):
        a = time.perf_counter()
        sess.run(None, {"x": x})
        per.append(time.perf_counter() - a)
    return 1e3 * statistics.median(per)


def bytes_per_token(wsec, s) -> dict:
    """Weight bytes one decode token reads: router, shared experts, and the routed experts it computes."""
    t = wsec["tensors"]
    common = sum(v["nbytes"] for n, v in t.items() if n == "mlp.gate.weight" or n.startswith("mlp.shared_experts."))
    expert = sum(v["nbytes"] for n, v in t.items() if n.startswith("mlp.experts.0."))
    stacked = sum(v["nbytes"] for n, v in t.items() if n.startswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")))
    assert stacked == expert * s.n_routed_experts  # the same bytes, laid out per layer
    return {"all-experts": common + expert * s.n_routed_experts, "qmoe": common + expert * s.num_experts_per_tok,
            "qmoe-acc4": common + expert * s.num_experts_per_tok}


def measure(name: str, threads: int, runs: int, prefill: int) -> dict:
    import numpy as np

    s, r = shape(name)
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        wsec, groups, fp16 = write_weights(d / "moe.weights", s)
        export(s, r, True, d / "all-experts.onnx", wsec, groups, fp16)
        export(s, r, False, d / "qmoe.onnx", wsec, groups, fp16)
        with_accuracy_level(d / "qmoe.onnx", d / "qmoe-acc4.onnx", 4)
        out = {"shape": name, "hidden": s.hidden_size, "experts": s.n_routed_experts, "shared": s.n_shared_experts,
               "active": s.num_experts_per_tok, "moe_intermediate": s.moe_intermediate_size, "threads": threads, "runs": runs,
               "bytes_per_token": bytes_per_token(wsec, s), "forms": {}}
        x1 = rng.standard_normal((1, 1, s.hidden_size), dtype=np.float32)
        xp = rng.standard_normal((1, prefill, s.hidden_size), dtype=np.float32)
        ref = {}
        for form in FORMS:
            sess = session(d / f"{form}.onnx", threads)
            y1, yp = sess.run(None, {"x": x1})[0], sess.run(None, {"x": xp})[0]
            ref.setdefault("1", y1), ref.setdefault("p", yp)
            diff = max(np.abs(y1 - ref["1"]).max() / np.abs(ref["1"]).max(), np.abs(yp - ref["p"]).max() / np.abs(ref["p"]).max())
            out["forms"][form] = {"decode_ms": time_runs(sess, x1, runs), f"prefill{prefill}_ms": time_runs(sess, xp, max(3, runs // 4)),
                                  "rel_diff_vs_all_experts": float(diff)}
            del sess
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads < 1 or a.runs < 1 or a.prefill < 1:
        ap.error("--threads, --runs and --prefill must be positive")
    results = [measure(n, a.threads, a.runs, a.prefill) for n in a.shape]
    if a.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"onnxruntime CPU provider, {a.threads} thread(s), median of {a.runs} runs; loadavg {os.getloadavg()[0]:.1f}")
    for res in results:
        print(f"\n{res['shape']}: hidden {res['hidden']}, {res['experts']} routed + {res['shared']} shared experts, "
              f"{res['active']} active, moe_intermediate {res['moe_intermediate']}")
        print(f"  {'form':12s} {'decode ms':>10s} {'prefill' + str(a.prefill) + ' ms':>14s} {'MB/token':>9s} {'rel diff':>9s}")
        for form, f in res["forms"].items():
            print(f"  {form:12s} {f['decode_ms']:10.2f} {f[f'prefill{a.prefill}_ms']:14.1f} "
                  f"{res['bytes_per_token'][form] / 1e6:9.2f} {f['rel_diff_vs_all_experts']:9.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
