#!/usr/bin/env python
"""DeepSeek-V2-Lite's shape with fewer decoder layers: conversion (one layer at a time) and the runtime.

    python benchmarks/bench_deepseek_v2.py [--layers 3] [--work /tmp/edge-sdk-bench-dsv2] [--keep]

Builds a random-weight bf16 checkpoint of edge_sdk/data/configs/deepseek-v2-lite-chat.json (hidden
2048, 16 heads, MLA 512/64, nope 128, v 128, 64 routed + 2 shared experts, 6 active, first layer
dense) cut to --layers layers, with the SDK's small tokenizer. Then, each in a child process:
`edge-sdk convert --method rtn --json` (wall time, peak RSS), and `edge_sdk.load` + the runtime's
bench on onnxruntime's CPU provider (decode and prefill tok/s). Bytes read per token are the
planner's active-parameter figure (weights of the top-k experts only, plus the MLA cache); the
roofline is those bytes at the runtime's own read-bandwidth probe. Random weights measure cost, not
accuracy. The load average is printed beside each number (the machine may be shared). Group size 64
by default: the dense first layer's intermediate_size 10944 is 85.5 groups of 128, so g128 is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path


def lite_config(layers: int) -> dict:
    cfg = json.loads(resources.files("edge_sdk.data").joinpath("configs", "deepseek-v2-lite-chat.json").read_text())
    cfg |= {"num_hidden_layers": layers, "bos_token_id": 0, "eos_token_id": 1}
    cfg.pop("torch_dtype", None)
    return cfg


def tensor_shapes(s) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in file order (names as deepseek_v2.layer_names)."""
    from edge_sdk.converters.deepseek_v2 import layer_names

    h, heads, r, rope = s.hidden_size, s.num_heads, s.kv_lora_rank, s.qk_rope_head_dim
    qd = heads * (s.qk_nope_head_dim + rope)
    att = {"q_proj": (qd, h), "q_a_proj": (s.q_lora_rank or 0, h), "q_b_proj": (qd, s.q_lora_rank or 0),
           "kv_a_proj_with_mqa": (r + rope, h), "kv_b_proj": (heads * (s.qk_nope_head_dim + s.v_head_dim), r),
           "o_proj": (h, heads * s.v_head_dim), "q_a_layernorm": (s.q_lora_rank or 0,), "kv_a_layernorm": (r,)}
    out = {"model.embed_tokens.weight": (s.vocab_size, h)}
    for i in range(s.num_layers):
        for n in layer_names(s, i):
            part = n.split(".")[-2]
            if ".self_attn." in n:
                out[n] = att[part]
            elif "layernorm" in n:
                out[n] = (h,)
            elif n.endswith(".mlp.gate.weight"):
                out[n] = (s.n_routed_experts, h)
            elif n.endswith("e_score_correction_bias"):
                out[n] = (s.n_routed_experts,)
            else:
                inter = s.moe_intermediate_size if ".experts." in n else \
                    s.moe_intermediate_size * s.n_shared_experts if ".shared_experts." in n else s.intermediate_size
                out[n] = (h, inter) if part == "down_proj" else (inter, h)
    return out | {"model.norm.weight": (h,), "lm_head.weight": (s.vocab_size, h)}


def build(work: Path, layers: int, shard_bytes: int = 2 * 2**30) -> Path:
    """A sharded bf16 checkpoint with model.safetensors.index.json, written one tensor at a time."""
    from bench_convert import write_random_checkpoint

    from edge_sdk.modelspec import shape_from_config

    d = work / f"deepseek-v2-lite-random-{layers}l"
    if (d / "model.safetensors.index.json").is_file():
        return d
    cfg = lite_config(layers)
    return write_random_checkpoint(d, cfg, tensor_shapes(shape_from_config(cfg)), shard_bytes)


def loadavg() -> float:
    return os.getloadavg()[0]


def convert(src: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "edge_sdk.cli.main", "convert", str(src), "-o", str(out), "--overwrite", "--json",
           "--method", "rtn", "--group-size", str(args.group_size), "--nsamples", "4", "--seqlen", "64", "--eval-tokens", str(args.eval_tokens),
           "--max-ppl-increase", "1000", "--min-top1-agreement", "0"]
    before, t = loadavg(), time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode:
        raise SystemExit(f"convert failed ({r.returncode})")
    s = json.loads(r.stdout)
    return {"wall_s": round(time.perf_counter() - t, 1), "seconds": s["seconds"], "peak_rss_bytes": s["peak_rss_bytes"],
            "weight_bytes": s["weight_bytes"], "accuracy": {k: s["accuracy"].get(k) for k in ("ppl_increase_percent", "onnx_vs_torch")},
            "loadavg": [before, loadavg()]}


RUNTIME = """
import json, os, sys
import edge_sdk
from edge_sdk.runtime.generate.bench import bench
m = edge_sdk.load(sys.argv[1])
out = {}
for name, prompt, new in (("decode", 16, 64), ("prefill", 128, 1)):
    la = os.getloadavg()[0]
    out[name] = bench(m, prompt_tokens=prompt, new_tokens=new, repeats=3, bandwidth_gbps=float(sys.argv[2])) | {"loadavg_before": la}
print(json.dumps(out))
"""


def probe_gbps() -> tuple[float, float]:
    from edge_sdk.runtime.generate.bench import read_bandwidth_gbps

    la = loadavg()
    return read_bandwidth_gbps(), la


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3, help="decoder layers (the first dense, the rest MoE)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-sdk-bench-dsv2"))
    ap.add_argument("--eval-tokens", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64, help="64: V2-Lite's intermediate_size 10944 is no multiple of 128")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and bundle in --work")
    args = ap.parse_args(argv)
    from edge_sdk.modelspec import shape_from_config
    from edge_sdk.planner import QuantSpec, weight_bytes

    t = time.perf_counter()
    src = build(args.work, args.layers)
    built = round(time.perf_counter() - t, 1)
    out = args.work / f"bundle-{args.layers}l"
    try:
        conv = convert(src, out, args)
        gbps, probe_load = probe_gbps()
        r = subprocess.run([sys.executable, "-c", RUNTIME, str(out), str(gbps)], stdout=subprocess.PIPE, text=True)
        if r.returncode:
            raise SystemExit(f"runtime bench failed ({r.returncode})")
        rt = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    s = shape_from_config(lite_config(args.layers))
    wb = weight_bytes(s, QuantSpec(group_size=args.group_size))
    dec = rt["decode"]
    kv = dec["kv_bytes_per_step"]
    per_token = wb.read_per_token + kv
    roofline = gbps * 1e9 / per_token
    share = dec["decode_tokens_per_s"] / roofline
    result = {"layers": args.layers, "checkpoint_build_s": built, "convert": conv,
              "planner_read_per_token_bytes": wb.read_per_token, "kv_bytes_per_token_at_context": kv,
              "bundle_weight_bytes": conv["weight_bytes"], "planner_weight_bytes": wb.total,
              "bandwidth_probe_gbps": round(gbps, 2), "probe_loadavg": probe_load,
              "decode_tokens_per_s": dec["decode_tokens_per_s"], "decode_loadavg": dec["loadavg_before"],
              "prefill_tokens_per_s": rt["prefill"]["prefill_tokens_per_s"], "prefill_loadavg": rt["prefill"]["loadavg_before"],
              "runtime_peak_rss_bytes": dec["peak_rss_bytes"], "backend": dec["backend"],
              "roofline_tokens_per_s": round(roofline, 2),
              "roofline_share": round(share, 4) if share <= 1 else None,
              "roofline_note": "above 100 %: the probe under-reads, no share given" if share > 1 else ""}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
