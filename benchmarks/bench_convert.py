#!/usr/bin/env python
"""Conversion time and peak memory for a random-weight model with a real DeepSeek shape.

    python benchmarks/bench_convert.py [--config deepseek-r1-distill-qwen-1.5b] [--nsamples 32] [--seqlen 512]

Builds the checkpoint (bf16 safetensors, random weights, the SDK's small tokenizer: calibration ids
stay below its vocabulary, which changes nothing in the cost) in --work, then runs
`edge-sdk convert --json` in a child process and reports its wall time per stage, its peak RSS,
and the bundle's weight bytes against `edge-sdk plan`. Random weights measure cost, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path


def build(cfg_name: str, work: Path, layers: int | None) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edge_sdk.converters.tiny import build_tokenizer, default_calibration_text, write_tokenizer

    d = work / (f"{cfg_name}-random" + (f"-{layers}l" if layers else ""))
    if d.is_dir() and any(d.glob("*.safetensors")):
        return d
    cfg = json.loads(resources.files("edge_sdk.data").joinpath("configs", f"{cfg_name}.json").read_text())
    if layers:
        cfg["num_hidden_layers"] = layers
        cfg["max_window_layers"] = min(cfg.get("max_window_layers", layers), layers)
    cfg.pop("torch_dtype", None)
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"}, architectures=cfg["architectures"])
    torch.manual_seed(0)
    t = time.time()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(d, safe_serialization=True)
    tok = build_tokenizer([default_calibration_text()])
    write_tokenizer(tok, d)
    cfg_saved = json.loads((d / "config.json").read_text())
    cfg_saved["bos_token_id"], cfg_saved["eos_token_id"] = 0, 1
    (d / "config.json").write_text(json.dumps(cfg_saved, indent=2))
    print(f"built {d} in {time.time() - t:.0f}s", file=sys.stderr)
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="deepseek-r1-distill-qwen-1.5b")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGE_SDK_CACHE", Path.home() / ".cache" / "edge-sdk")) / "bench")
    ap.add_argument("--layers", type=int, help="fewer decoder layers (a partial measurement)")
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=512)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    src = build(args.config, args.work, args.layers)
    out = args.work / f"{src.name}-{args.method}.bundle"
    load = os.getloadavg()
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "edge_sdk.cli.main", "convert", str(src), "-o", str(out), "--overwrite", "--json",
                        "--method", args.method, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                        "--eval-tokens", str(args.eval_tokens)], stdout=subprocess.PIPE, text=True)
    wall = time.time() - t
    if r.returncode:
        print(f"convert failed with exit code {r.returncode}", file=sys.stderr)
        return r.returncode
    s = json.loads(r.stdout)
    from edge_sdk.planner import plan

    planned = plan(out, "agx-orin-64gb").weight_bytes["total"]
    result = {
        "config": args.config, "layers": args.layers, "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "wall_s": round(wall, 1), "stages_s": s["seconds"],
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "bundle_weight_bytes": s["weight_bytes"], "planned_weight_bytes": planned,
        "plan_diff_percent": round(100 * (s["weight_bytes"] - planned) / planned, 3),
        "files": s["files"], "loadavg_before": [round(x, 2) for x in load], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
