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
    python scripts/train_tiny.py --size copy  # the default shape and tokenizer, trained with a copy mix: 3 in 4 of
                                              # the windows repeat a span (tiny-trained-qwen2-copy/), so the
                                              # model continues a repeat, as prompt lookup needs
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
# --size copy: the default shape, but a fraction (copy_mix) of the training windows are a corpus span
# followed by a repeat of it, sometimes lightly edited (one token renamed: a second token inserted
# after each occurrence, as `name` -> `name_new`). A 2-layer model trained on plain text alone never
# learns to copy its context (no induction heads); this mix elicits them. Longer windows, so a copy
# reaches back as far as a source file prompt does.
SIZES["copy"] = {}
COPY_RECIPE = 1  # bump when the copy windows change
COPY_OUT = DEFAULT_OUT.parent / "tiny-trained-qwen2-copy"
OUTS = {"small": DEFAULT_OUT, "large": LARGE_OUT, "copy": COPY_OUT}
SIZE_DEFAULTS = {"small": {"steps": 400, "batch": 16, "seqlen": 128, "copy_mix": 0.0},
                 "large": {"steps": 400, "batch": 16, "seqlen": 128, "copy_mix": 0.0},
                 "copy": {"steps": 1600, "batch": 6, "seqlen": 384, "copy_mix": 0.75}}


def corpus_text(part: str) -> str:
    return lzma.decompress((CORPUS / f"{part}.txt.xz").read_bytes()).decode("utf-8")


def fingerprint(args) -> str:
    """What the trained model is a function of: corpus bytes, recipe, hyperparameters."""
    h = hashlib.sha256(f"recipe={RECIPE} steps={args.steps} batch={args.batch} seqlen={args.seqlen} "
                       f"vocab={args.vocab} seed={args.seed}".encode())
    if getattr(args, "size", "small") != "small":
        h.update(f" size={args.size} {sorted(SIZES[args.size].items())}".encode())
        if args.copy_mix:
            h.update(f" copy_mix={args.copy_mix} copy_recipe={COPY_RECIPE}".encode())
    for part in PARTS:
        h.update((CORPUS / f"{part}.txt.xz").read_bytes())
    return h.hexdigest()


def is_current(args) -> bool:
    try:
        info = json.loads((args.out / "training.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("fingerprint") == fingerprint(args) and (args.out / "model.safetensors").is_file()


def copy_window(ids, start: int, span: int, gap: int, seqlen: int, rename: tuple[int, int] | None = None,
                order: list[int] | None = None) -> list[int]:
    """One training window of `seqlen` tokens that repeats a span: the corpus text before `start`
    (as much as fills the window), ids[start:start+span], the `gap` tokens that follow it, then the
    span again; with rename=(a, b), b is inserted after each a in the repeat; with order (a
    permutation of range(span)), the span's tokens are taken in that order, in both copies, so that
    only copying predicts the repeat. Cut to `seqlen`."""
    first = [int(ids[start + i]) for i in (order if order is not None else range(span))]
    repeat = [u for t in first for u in ((t, rename[1]) if rename and t == rename[0] else (t,))]
    body = first + [int(t) for t in ids[start + span:start + span + gap]] + repeat
    pre = max(0, seqlen - len(body))
    if pre > start:
        raise ValueError(f"copy window at {start} needs {pre} tokens of text before it: start at {pre} or later")
    return ([int(t) for t in ids[start - pre:start]] + body)[:seqlen]


def sample_copy_window(ids, seqlen: int, g) -> list[int]:
    """A copy window at random (torch generator g): a span of seqlen/8 .. 0.7 seqlen tokens, a gap of
    0-16; half the time one token of the span renamed, else half the time the span's tokens shuffled."""
    import torch

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    span, gap = draw(seqlen // 8, int(0.7 * seqlen)), draw(0, 16)
    start = draw(seqlen, len(ids) - 2 * seqlen)
    rename = order = None
    if draw(0, 1):
        rename = (int(ids[start + draw(0, span - 1)]), int(ids[draw(0, len(ids) - 1)]))
    elif draw(0, 1):
        order = torch.randperm(span, generator=g).tolist()
    return copy_window(ids, start, span, gap, seqlen, rename, order)


def repeat_accuracy(model, ids, span: int = 100, at=(1000, 5000, 9000)) -> float:
    """How often the model's greedy next token is right inside the second copy of a repeated
    held-out span: about 0.15 for a model that does not copy, near 1 for one that does."""
    import torch

    right = 0
    with torch.no_grad():
        for s in at:
            x = torch.tensor([list(ids[s:s + span]) * 2])
            right += int((model(input_ids=x).logits[0, span:2 * span - 1].argmax(-1) == x[0, span + 1:]).sum())
    return right / (len(at) * (span - 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT} ({LARGE_OUT} with --size large)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small",
                    help="large: hidden 384, 4 layers, same tokenizer; copy: the default shape trained with a copy mix")
    ap.add_argument("--steps", type=int, default=None, help="default 400 (copy: 1600)")
    ap.add_argument("--batch", type=int, default=None, help="default 16 (copy: 6)")
    ap.add_argument("--seqlen", type=int, default=None, help="default 128 (copy: 384)")
    ap.add_argument("--copy-mix", type=float, default=None, help="fraction of windows that repeat a span (copy: 0.75)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="exit 0 if the cached model matches this recipe, 1 if not")
    args = ap.parse_args(argv)
    for k, v in SIZE_DEFAULTS[args.size].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not 0.0 <= args.copy_mix <= 1.0 or (args.copy_mix and args.size == "small"):
        ap.error("--copy-mix is a fraction in [0, 1], for --size copy or large (the default model has none)")
    if args.out is None:
        args.out = OUTS[args.size]
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
    ev_ids = tok.encode(held_out).ids
    ids = torch.tensor(tok.encode(train).ids)
    cfg = tiny_config("qwen2", tok.get_vocab_size(), **SIZES[args.size])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"},
                                                                  architectures=cfg["architectures"]), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="train", mininterval=5)
    for step in bar:
        n_copy = round(args.copy_mix * args.batch)
        starts = torch.randint(0, len(ids) - args.seqlen - 1, (args.batch - n_copy,), generator=g)
        x = torch.stack([ids[s: s + args.seqlen] for s in starts]
                        + [torch.tensor(sample_copy_window(ids, args.seqlen, g)) for _ in range(n_copy)])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if args.copy_mix and (step + 1) % 200 == 0:
            print(f"step {step + 1}: held-out repeat accuracy {repeat_accuracy(model, ev_ids):.3f}", flush=True)
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
    if args.size != "small":  # the recipe, and the default model's held-out perplexity on the same text beside it
        info.update(batch=args.batch, seqlen=args.seqlen, copy_mix=args.copy_mix, held_out_repeat_accuracy=round(repeat_accuracy(model, ev_ids), 3))
        if (DEFAULT_OUT / "model.safetensors").is_file():
            with torch.no_grad():
                base = AutoModelForCausalLM.from_pretrained(DEFAULT_OUT, dtype=torch.float32)
                info["default_model_held_out_ppl"] = round(math.exp(base(input_ids=ev, labels=ev).loss.item()), 3)
            info["default_model_held_out_repeat_accuracy"] = round(repeat_accuracy(base, ev_ids), 3)
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
