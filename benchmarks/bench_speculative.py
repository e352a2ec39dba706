"""Speculative decoding on this machine, plain and speculative decode side by side in one run (batch 1, greedy).

  lookup  prompt lookup on a code-editing workload: the trained tiny Qwen2 (scripts/train_tiny.py, RTN int4)
          is given a held-out Python excerpt, an instruction to copy it with one identifier renamed, and
          the first lines of that copy; it decodes the rest. The same for the model of the same shape
          trained to copy (scripts/train_tiny.py --size copy, or --lookup-target DIR) when it is there.
  pair    a draft/target pair trained on the same corpus and tokenizer: the tiny model drafts for the
          larger one (scripts/train_tiny.py --size large), on held-out text.
  verify  the cost of checking k = 1..8 draft tokens in one forward (k + 1 tokens) as a ratio to a
          single-token step, on a bundle with the DeepSeek-R1-Distill-Qwen-1.5B shape (--verify-bundle,
          e.g. from benchmarks/bench_decode.py prepare), else on the tiny model; and the speedup it
          predicts for prompt lookup (no draft cost) at acceptance 0.5 / 0.7 / 0.9.

    python benchmarks/bench_speculative.py [--parts lookup pair verify] [--verify-bundle /tmp/bench-1.5b/bundle]

Numbers depend on the machine's load: the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def rtn_bundle(model_dir: Path, out: Path) -> Path:
    if not (out / "manifest.json").exists():
        import edge_sdk

        edge_sdk.convert(model_dir, out, method="rtn")
    return out


def load(bundle: Path, draft: Path | None = None):
    import edge_sdk

    return edge_sdk.load(bundle, provider="cpu", log_provider=False, draft=draft)


def code_edit_prompt(source: str, lines: int = 30, given: int = 4) -> tuple[str, str]:
    """(prompt, the expected rest): a def-started excerpt, an instruction to rename its most frequent
    identifier, and the first `given` lines of the edited copy."""
    rows = source.splitlines()
    start = next(i for i, r in enumerate(rows) if r.startswith("    def ") and i > 200)
    excerpt = "\n".join(rows[start:start + lines])
    words = Counter(w for w in re.findall(r"\b[a-z_][a-z0-9_]{3,}\b", excerpt) if w not in {"self", "return", "none", "else"})
    old = words.most_common(1)[0][0]
    edited = re.sub(rf"\b{old}\b", old + "_new", excerpt).splitlines()
    head = "\n".join(edited[:given])
    prompt = f"{excerpt}\n\n# The same code with `{old}` renamed to `{old}_new`:\n{head}\n"
    return prompt, "\n".join(edited[given:])


def side_by_side(model, prompts: list[str], new_tokens: int, spec, repeats: int) -> dict:
    """Plain and speculative greedy decode, interleaved; medians of decode tok/s, totals of acceptance."""
    plain, fast, same, proposed, accepted, steps, tokens = [], [], True, 0, 0, 0, 0
    for _ in range(repeats):
        for p in prompts:
            a = model.generate(p, max_new_tokens=new_tokens, speculative=False, ignore_eos=True)
            plain.append(a.timings.decode_tokens_per_s)
            b = model.generate(p, max_new_tokens=new_tokens, speculative=spec, ignore_eos=True)
            t = b.timings
            fast.append(t.decode_tokens_per_s)
            same &= a.token_ids == b.token_ids
            proposed, accepted = proposed + t.spec_proposed, accepted + t.spec_accepted
            steps, tokens = steps + t.decode_steps, tokens + t.decode_tokens
    p_tps, f_tps = statistics.median(plain), statistics.median(fast)
    return {"plain_decode_tokens_per_s": round(p_tps, 1), "speculative_decode_tokens_per_s": round(f_tps, 1),
            "speedup": round(f_tps / p_tps, 3), "acceptance_rate": round(accepted / max(1, proposed), 3),
            "tokens_per_verify_step": round(tokens / max(1, steps), 3), "greedy_identical": same,
            "prompts": len(prompts), "new_tokens": new_tokens, "repeats": repeats}


def lookup_targets(args) -> list[Path]:
    """The default tiny model, and the copy-trained one (or --lookup-target) when it is there."""
    from train_tiny import COPY_OUT, DEFAULT_OUT

    extra = args.lookup_target or COPY_OUT
    if args.lookup_target and not (extra / "model.safetensors").is_file():
        raise SystemExit(f"--lookup-target {extra}: no model.safetensors there; give a trained model directory "
                         "(python scripts/train_tiny.py --size copy writes one)")
    return [DEFAULT_OUT] + ([extra] if (extra / "model.safetensors").is_file() else [])


def part_lookup(work: Path, args) -> dict:
    import hashlib

    from train_tiny import corpus_text

    prompt, expected = code_edit_prompt(corpus_text("eval"))
    excerpt = prompt.split("\n\n# The same code")[0]
    r = {"excerpt_in_training_text": excerpt in corpus_text("train")}  # False: the prompt is held-out text
    spec = {"prompt_lookup": True, "k": 4}
    for target in lookup_targets(args):
        tag = hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()[:10]
        model = load(rtn_bundle(target, work / f"{target.name}-{tag}-rtn"))
        row = r[target.name] = {"code_edit": side_by_side(model, [prompt], args.new_tokens, spec, args.repeats)}
        row["code_edit"]["prompt_tokens"] = len(model.tokenizer.encode(prompt))
        own = model.generate(prompt, max_new_tokens=args.new_tokens, speculative=False, ignore_eos=True).text
        # how much of the edited copy the model's own greedy continuation reproduces, in characters
        row["code_edit"]["copied_chars"] = next((i for i, (a, b) in enumerate(zip(own, expected)) if a != b), min(len(own), len(expected)))
        # the upper bound for a model that does not copy: its own greedy continuation placed in the
        # prompt first (as a model that copies the source would produce it), then asked again
        row["output_in_prompt"] = side_by_side(model, [prompt + own + "\n\n" + prompt], args.new_tokens, spec, args.repeats)
    return r


def part_pair(work: Path, args) -> dict:
    from train_tiny import DEFAULT_OUT, LARGE_OUT, corpus_text

    if not (LARGE_OUT / "model.safetensors").is_file():
        return {"skipped": f"no larger model in {LARGE_OUT}: run `python scripts/train_tiny.py --size large`"}
    draft = rtn_bundle(DEFAULT_OUT, work / "tiny-rtn")
    model = load(rtn_bundle(LARGE_OUT, work / "large-rtn"), draft=draft)
    text = corpus_text("eval")
    prompts = [text[i:i + 600] for i in (20_000, 40_000, 60_000)]  # held-out, 3 places
    r = side_by_side(model, prompts, args.new_tokens, {"k": 4}, args.repeats)
    alone = [load(draft).generate(p, max_new_tokens=args.new_tokens, speculative=False, ignore_eos=True).timings.decode_tokens_per_s
             for p in prompts]
    r["draft_plain_decode_tokens_per_s"] = round(statistics.median(alone), 1)
    r["draft_step_ratio"] = round(r["plain_decode_tokens_per_s"] / r["draft_plain_decode_tokens_per_s"], 3)  # a draft step / a target step
    r["target_weight_mib"] = round(sum(f.stat().st_size for f in (work / "large-rtn").glob("*.weights")) / 2**20, 2)
    r["draft_weight_mib"] = round(sum(f.stat().st_size for f in draft.glob("*.weights")) / 2**20, 2)
    return r


def part_verify(work: Path, args) -> dict:
    import numpy as np

    from edge_sdk.planner import expected_tokens

    bundle = args.verify_bundle
    if bundle is None or not (bundle / "manifest.json").exists():
        from train_tiny import DEFAULT_OUT

        bundle = rtn_bundle(DEFAULT_OUT, work / "tiny-rtn")
    model = load(bundle)
    be = model.backend
    vocab = be.io.vocab_size
    rng = np.random.default_rng(0)
    ctx = 64
    cache = be.new_cache(1, ctx + 16)
    be.forward(rng.integers(3, vocab, (1, ctx)), cache)
    times = {n: [] for n in range(1, 10)}
    for _ in range(args.verify_repeats):
        for n in times:  # interleaved so load changes hit every size alike
            ids = rng.integers(3, vocab, (1, n))
            s = time.perf_counter()
            be.forward(ids, cache)
            times[n].append(time.perf_counter() - s)
            cache.rollback(ctx)
    step = statistics.median(times[1])
    ratio = {k: round(statistics.median(times[k + 1]) / step, 3) for k in range(1, 9)}
    curve = {a: {k: round(expected_tokens(a, k) / ratio[k], 3) for k in ratio} for a in (0.5, 0.7, 0.9)}
    return {"bundle": str(bundle), "architecture": model.manifest.get("architecture", {}).get("name"),
            "hidden_size": model.manifest.get("architecture", {}).get("hidden_size"),
            "single_step_ms": round(1000 * step, 2), "verify_ratio_by_k": ratio,
            "extra_token_cost": round((ratio[8] - 1) / 8, 4), "predicted_lookup_speedup": curve}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["lookup", "pair", "verify"], choices=("lookup", "pair", "verify"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edge-sdk-bench-spec"))
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lookup-target", type=Path, default=None,
                    help="a trained model directory measured by `lookup` beside the default tiny model "
                         "(default: scripts/train_tiny.py --size copy's, when trained)")
    ap.add_argument("--verify-bundle", type=Path, default=Path("/tmp/bench-1.5b/bundle"))
    ap.add_argument("--verify-repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = {"machine": {"cpus": len(os.sched_getaffinity(0)), "load_before": [round(x, 2) for x in os.getloadavg()]}}
    for part in args.parts:
        out[part] = globals()[f"part_{part}"](args.workdir, args)
        if not args.json:
            print(part, json.dumps(out[part]), flush=True)
    out["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2) if args.json else f"machine {json.dumps(out['machine'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
