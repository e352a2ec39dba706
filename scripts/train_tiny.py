#!/usr/bin/env python
"""Train a tiny Qwen2-architecture model on Python's own standard-library sources (local text only).

The result, cached under ~/.cache/edge-sdk/tiny-trained-qwen2/, is a real Hugging Face model
directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) plus eval.txt
(held-out stdlib source) and calib.txt (in-domain calibration text) for accuracy reports: a trained model shows what int4 quantization
really costs, which random weights cannot. A few minutes on one CPU core.

    python scripts/train_tiny.py [--steps 400] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from pathlib import Path

DEFAULT_OUT = Path(os.environ.get("EDGE_SDK_CACHE", Path.home() / ".cache" / "edge-sdk")) / "tiny-trained-qwen2"
TRAIN_MODULES = ["argparse", "collections/__init__", "json/decoder", "json/encoder", "pathlib", "shutil", "textwrap",
                 "tempfile", "csv", "dataclasses", "functools", "inspect", "string", "typing", "subprocess", "logging/__init__"]
EVAL_MODULES = ["configparser", "fractions"]
CALIB_MODULES = ["argparse", "pathlib"]  # part of the training text


def stdlib_text(modules: list[str]) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for m in modules:
        p = root / f"{m}.py"
        if p.exists():
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from edge_sdk.converters.tiny import build_tokenizer, tiny_config, write_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, held_out = stdlib_text(TRAIN_MODULES), stdlib_text(EVAL_MODULES)
    tok = build_tokenizer([train], vocab_size=args.vocab)
    ids = torch.tensor(tok.encode(train).ids)
    cfg = tiny_config("qwen2", tok.get_vocab_size())
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"},
                                                                  architectures=cfg["architectures"]), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="train")
    for _ in bar:
        starts = torch.randint(0, len(ids) - args.seqlen - 1, (args.batch,), generator=g)
        x = torch.stack([ids[s: s + args.seqlen] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    write_tokenizer(tok, args.out)
    (args.out / "eval.txt").write_text(held_out, encoding="utf-8")
    (args.out / "calib.txt").write_text(stdlib_text(CALIB_MODULES), encoding="utf-8")  # in-domain calibration
    with torch.no_grad():
        ev = torch.tensor(tok.encode(held_out).ids[:2048]).unsqueeze(0)
        ppl = math.exp(model(input_ids=ev, labels=ev).loss.item())
    info = {"steps": args.steps, "seconds": round(time.time() - t0, 1), "train_tokens": len(ids), "final_loss": round(loss.item(), 4),
            "held_out_ppl": round(ppl, 3), "train_modules": TRAIN_MODULES, "eval_modules": EVAL_MODULES}
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
