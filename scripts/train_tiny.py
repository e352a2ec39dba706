#!/usr/bin/env python
"""Train a tiny Qwen2-architecture model on a fixed corpus shipped with the tests (local text only).

The corpus (tests/data/corpus/: Python source text, see its README) is the same bytes on every
machine, the seeds are fixed and training runs on one thread, so the model does not depend on the
Python build that runs the script. The result, cached under ~/.cache/edge-sdk/tiny-trained-qwen2/,
is a real Hugging Face model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) plus eval.txt (held-out text) and calib.txt (in-domain calibration text)
for accuracy reports: a trained model shows what int4 quantization really costs, which random
weights cannot. A few minutes on one CPU core.

    python scripts/train_tiny.py [--steps 400] [--out DIR]
    python scripts/train_tiny.py --check      # exit 0 when the cached model is current
    python scripts/train_tiny.py --size large # hidden 384, 4 layers, same tokenizer: a target for the
                                              # default model as speculative draft (tiny-trained-qwen2-large/)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import time
from pathlib import Path

from edge_sdk.paths import cache_dir

DEFAULT_OUT = cache_dir() / "tiny-trained-qwen2"
CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "corpus"
PARTS = ("train", "eval", "calib")  # calib is a slice of the training text; eval is held out
RECIPE = 2  # bump when training changes, so a cached model from an older recipe is retrained
# --size large: a bigger model on the same corpus and tokenizer (a speculative-decoding target for
# the default model as draft), cached beside it; the default size adds nothing to the fingerprint
SIZES = {"small": {}, "large": {"hidden_size": 384, "intermediate_size": 768, "num_hidden_layers": 4,
                                "num_attention_heads": 6, "num_key_value_heads": 2}}
LARGE_OUT = DEFAULT_OUT.parent / "tiny-trained-qwen2-large"


def corpus_text(part: str) -> str:
    return lzma.decompress((CORPUS / f"{part}.txt.xz").read_bytes()).decode("utf-8")


def fingerprint(args) -> str:
    """What the trained model is a function of: corpus bytes, recipe, hyperparameters."""
    h = hashlib.sha256(f"recipe={RECIPE} steps={args.steps} batch={args.batch} seqlen={args.seqlen} "
                       f"vocab={args.vocab} seed={args.seed}".encode())
    if getattr(args, "size", "small") != "small":
        h.update(f" size={args.size} {sorted(SIZES[args.size].items())}".encode())
    for part in PARTS:
        h.update((CORPUS / f"{part}.txt.xz").read_bytes())
    return h.hexdigest()


def is_current(args) -> bool:
    try:
        info = json.loads((args.out / "training.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("fingerprint") == fingerprint(args) and (args.out / "model.safetensors").is_file()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT} ({LARGE_OUT} with --size large)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small", help="large: hidden 384, 4 layers, same tokenizer")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="exit 0 if the cached model matches this recipe, 1 if not")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = LARGE_OUT if args.size == "large" else DEFAULT_OUT
    if args.check:
        return 0 if is_current(args) else 1

    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from edge_sdk.converters.tiny import build_tokenizer, tiny_config, write_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    train, held_out = corpus_text("train"), corpus_text("eval")
    tok = build_tokenizer([train], vocab_size=args.vocab)
    ids = torch.tensor(tok.encode(train).ids)
    cfg = tiny_config("qwen2", tok.get_vocab_size(), **SIZES[args.size])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"},
                                                                  architectures=cfg["architectures"]), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="train", mininterval=5)
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
    (args.out / "calib.txt").write_text(corpus_text("calib"), encoding="utf-8")  # in-domain calibration
    with torch.no_grad():
        ev = torch.tensor(tok.encode(held_out).ids[:2048]).unsqueeze(0)
        ppl = math.exp(model(input_ids=ev, labels=ev).loss.item())
    info = {"steps": args.steps, "seconds": round(time.time() - t0, 1), "train_tokens": len(ids), "final_loss": round(loss.item(), 4),
            "held_out_ppl": round(ppl, 3), "fingerprint": fingerprint(args)}
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
