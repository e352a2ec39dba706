"""GPTQ against round-to-nearest on the tiny trained model, over several training seeds, side by side.

For each seed, scripts/train_tiny.py trains the model (cached per seed under the cache directory), then
both methods convert it with the accuracy settings of tests/test_convert_trained.py and one row is printed:
perplexity of the float model, of each int4 model and its change, and each method's top-1 agreement with
the float model. These rows are the margins that test asserts (docs/conversion.md, "Accuracy").

    python benchmarks/bench_trained_accuracy.py [--seeds 0 1 2] [--lm-head-dtype fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

CALIB = dict(nsamples=32, seqlen=256, eval_tokens=2048)  # tests/test_convert_trained.py


def trained(seed: int) -> Path:
    import train_tiny

    out = train_tiny.DEFAULT_OUT if seed == 0 else train_tiny.DEFAULT_OUT.with_name(f"tiny-trained-qwen2-seed{seed}")
    argv = ["--out", str(out), "--seed", str(seed)]
    if train_tiny.main(argv + ["--check"]) != 0:
        train_tiny.main(argv)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lm-head-dtype", choices=["fp16", "int4"], default="fp16")
    args = ap.parse_args(argv)
    from edge_sdk.converters import convert

    print("| seed | ppl float | GPTQ ppl (change) | RTN ppl (change) | top-1 GPTQ | top-1 RTN |")
    rows = []
    for seed in args.seeds:
        model = trained(seed)
        acc = {}
        with tempfile.TemporaryDirectory() as tmp:
            for method in ("gptq", "rtn"):
                acc[method] = convert(model, Path(tmp) / method, method=method, calib=str(model / "calib.txt"),
                                      eval_text=str(model / "eval.txt"), lm_head_dtype=args.lm_head_dtype, progress=False,
                                      **CALIB)["accuracy"]
        g, r = acc["gptq"], acc["rtn"]
        rows.append({"seed": seed, "gptq": g, "rtn": r})
        print(f"| {seed} | {g['ppl_float']:.2f} | {g['ppl_quant']:.2f} ({g['ppl_increase_percent']:+.3f} %) | "
              f"{r['ppl_quant']:.2f} ({r['ppl_increase_percent']:+.3f} %) | {100 * g['top1_agreement']:.1f} % | "
              f"{100 * r['top1_agreement']:.1f} % |", flush=True)
    margins = [row["gptq"]["top1_agreement"] - row["rtn"]["top1_agreement"] for row in rows]
    print(json.dumps({"lm_head_dtype": args.lm_head_dtype, "top1_margin_points": [round(100 * m, 1) for m in margins]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
