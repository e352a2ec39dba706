"""Speculative decoding on this machine, plain and speculative decode side by side in one run (batch 1, greedy).

  lookup  prompt lookup on a code-editing workload: the trained tiny Qwen2 (scripts/train_tiny.py, RTN int4)
          is given a held-out Python excerpt, an instruction to copy it with one identifier renamed, and
          the first lines of that copy; it decodes the rest. The same for the model of the same shape
          trained to copy (scripts/train_tiny.py --size copy, or --lookup-target DIR...) when it is there.
  pair    a draft/target pair trained on the same corpus and tokenizer: the tiny model drafts for the
          larger one (scripts/train_tiny.py --size large), on held-out text.
  verify  the cost of checking k = 1..8 draft tokens in one forward (k + 1 tokens) as a ratio to a
          single-token step, on a bundle with the DeepSeek-R1-Distill-Qwen-1.5B shape (--verify-bundle,
          e.g. from benchmarks/bench_decode.py prepare), else on the tiny model; and the speedup it
          predicts for prompt lookup (no draft cost) at acceptance 0.5 / 0.7 / 0.9.

    python benchmarks/bench_speculative.py [--parts lookup pair verify] [--verify-bundle /tmp/bench-1.5b/bundle]
    python benchmarks/bench_speculative.py --parts lookup pair --target-budget resident 50% all-paged --emulate orin-nano-8gb

--target-budget: the settings the target runs under, measured side by side in the same run (every
setting's plain and speculative decode interleaved per prompt and round): `resident` (the default),
a memory budget (bytes or "N%" of its weights, embeddings included) under which the target pages
decoder layers from its weights file (docs/paging.md) at --emulate BOARD's storage speed (without
--emulate: what the disk gives), or `all-paged`: the smallest budget the executor runs under, every
decoder layer paged (a 2-layer model pages none above it: two layer buffers hold it all). The draft always stays resident: its weights are charged to the target's KV budget, its
steps to the speculative decode's time. A paged target stands in for a target bound by reading its
weights (a large int4 model on a device: every step reads every weight), which these tiny models
are not when resident (a step here is mostly fixed per-call work).

Numbers depend on the machine's load: the 1-minute load average is sampled every round and printed.
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


def load(bundle: Path, draft: Path | None = None, **options):
    import edge_sdk

    return edge_sdk.load(bundle, provider="cpu", log_provider=False, draft=draft, **options)


def all_paged_budget(bundle: Path) -> int:
    """The smallest memory budget the CPU provider's paged executor runs under: lm_head and norms plus
    two layer buffers (one read slot, one session), so every decoder layer is paged. The sizes are the
    fused sidecar's, computed by the planner from the config (equal to the executor's to the byte)."""
    from edge_sdk.modelspec import shape_from_config
    from edge_sdk.paging_model import page_round
    from edge_sdk.planner import QuantSpec, fused_layer_bytes

    m = json.loads((bundle / "manifest.json").read_text())
    q = m["quantization"]
    layers, fixed = fused_layer_bytes(shape_from_config(m["source"]["config"]),
                                      QuantSpec(bits=q["bits"], group_size=q["group_size"], lm_head_dtype=q["lm_head_dtype"]))
    return fixed + 2 * page_round(max(layers))


def load_target(bundle: Path, setting: str, args):
    """The target under one --target-budget setting: resident, or paged under that memory budget."""
    if setting == "resident":
        return load(bundle)
    budget = all_paged_budget(bundle) if setting == "all-paged" else int(setting) if setting.isdigit() else setting
    return load(bundle, memory_budget=budget, emulate=args.emulate)


def load_targets(bundle: Path, args) -> dict:
    """{setting: model}; a setting the executor refuses (a budget too small to page) is reported, not fatal."""
    from edge_sdk.errors import EdgeSDKError

    out = {}
    for setting in args.target_budget:
        try:
            model = load_target(bundle, setting, args)
        except EdgeSDKError as exc:
            model = str(exc)
        plan = getattr(getattr(model, "backend", None), "plan", None)
        if plan is not None and not plan.paged:
            model.backend.close()
            model = (f"pages no layer under {plan.budget_bytes:,} bytes: the {len(plan.layer_bytes)} decoder layers fit "
                     f"in what two layer buffers take")
        if isinstance(model, str):
            print(f"target {setting}: {model}", file=sys.stderr, flush=True)
        out[setting] = model
    return out


def paging_row(model) -> dict:
    """What the paged executor planned (layers resident / paged, bytes read per token, its load probe)
    and the storage bound it implies; {} for a resident target."""
    plan = getattr(model.backend, "plan", None)
    if plan is None:
        return {"paged_layers": 0}
    d = model.backend.describe()
    read = d.get("read_bytes_per_s")
    return {"executor": d.get("graph_form"), "budget_mib": round(plan.budget_bytes / 2**20, 3),
            "resident_layers": len(plan.resident), "paged_layers": len(plan.paged), "slots": plan.slots,
            "sessions": plan.sessions, "mib_paged_per_token": round(plan.bytes_paged_per_token / 2**20, 3),
            "emulated_read_mbps": round(read / 1e6) if read else None,
            "storage_bound_tokens_per_s": round(read / plan.bytes_paged_per_token, 1) if read and plan.paged else None,
            "probe": d.get("probe")}


def planner_prediction(rows: dict, draft_ratio: dict | float = 0.0) -> None:
    """Adds to each row the planner's model (edge_sdk.planner.speculative_speedup: a k-token verify costs
    1 + VERIFY_TOKEN_COST * k steps, as for a target bound by reading its weights) at the acceptance
    measured and the draft step measured (0 for prompt lookup): the best k and its speedup."""
    from edge_sdk.planner import SPEC_K_MAX, VERIFY_TOKEN_COST, speculative_speedup

    for name, row in rows.items():
        if not isinstance(row, dict) or "acceptance_rate" not in row:
            continue
        d = draft_ratio if isinstance(draft_ratio, float) else draft_ratio[name]
        best = max(range(1, SPEC_K_MAX + 1), key=lambda k: speculative_speedup(row["acceptance_rate"], k, d, 1 + VERIFY_TOKEN_COST * k))
        row["planner_predicted_speedup"] = round(speculative_speedup(row["acceptance_rate"], best, d, 1 + VERIFY_TOKEN_COST * best), 3)
        row["planner_best_k"] = best


def close(models: dict) -> None:
    for m in models.values():
        if hasattr(m, "backend") and hasattr(m.backend, "close"):
            m.backend.close()


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


def side_by_side(models: dict, prompts: list[str], new_tokens: int, spec, repeats: int) -> dict:
    """Plain and speculative greedy decode of each model (one per target setting), interleaved per prompt
    and round so load changes hit every setting alike; per setting medians of decode tok/s and totals of
    acceptance. A setting that did not load (a string saying why) is passed through as {"not_run": ...}."""
    live = {k: m for k, m in models.items() if not isinstance(m, str)}
    acc = {k: {"plain": [], "fast": [], "same": True, "proposed": 0, "accepted": 0, "steps": 0, "tokens": 0} for k in live}
    first = {}  # prompt -> the first setting's plain tokens: every setting must decode the same
    loads = [os.getloadavg()[0]]
    for _ in range(repeats):
        for p in prompts:
            for k, model in live.items():
                r = acc[k]
                a = model.generate(p, max_new_tokens=new_tokens, speculative=False, ignore_eos=True)
                r["plain"].append(a.timings.decode_tokens_per_s)
                b = model.generate(p, max_new_tokens=new_tokens, speculative=spec, ignore_eos=True)
                t = b.timings
                r["fast"].append(t.decode_tokens_per_s)
                r["same"] &= a.token_ids == b.token_ids == first.setdefault(p, a.token_ids)
                r["proposed"], r["accepted"] = r["proposed"] + t.spec_proposed, r["accepted"] + t.spec_accepted
                r["steps"], r["tokens"] = r["steps"] + t.decode_steps, r["tokens"] + t.decode_tokens
        loads.append(os.getloadavg()[0])
    out = {k: {"not_run": m} for k, m in models.items() if isinstance(m, str)}
    for k, r in acc.items():
        p_tps, f_tps = statistics.median(r["plain"]), statistics.median(r["fast"])
        out[k] = {"plain_decode_tokens_per_s": round(p_tps, 1), "speculative_decode_tokens_per_s": round(f_tps, 1),
                  "speedup": round(f_tps / p_tps, 3), "acceptance_rate": round(r["accepted"] / max(1, r["proposed"]), 3),
                  "tokens_per_verify_step": round(r["tokens"] / max(1, r["steps"]), 3), "greedy_identical": r["same"],
                  "prompts": len(prompts), "new_tokens": new_tokens, "repeats": repeats,
                  "load_1min": [round(min(loads), 2), round(max(loads), 2)], **paging_row(live[k])}
    return {k: out[k] for k in models}


def lookup_targets(args) -> list[Path]:
    """The default tiny model, and the copy-trained one (or the --lookup-target directories) when there."""
    from train_tiny import COPY_OUT, DEFAULT_OUT

    for d in args.lookup_target or []:
        if not (d / "model.safetensors").is_file():
            raise SystemExit(f"--lookup-target {d}: no model.safetensors there; give a trained model directory "
                             "(python scripts/train_tiny.py --size copy writes one)")
    extra = args.lookup_target or ([COPY_OUT] if (COPY_OUT / "model.safetensors").is_file() else [])
    return [DEFAULT_OUT] + [d for d in extra if d.resolve() != DEFAULT_OUT.resolve()]


def part_lookup(work: Path, args) -> dict:
    import hashlib

    from train_tiny import corpus_text

    prompt, expected = code_edit_prompt(corpus_text("eval"))
    excerpt = prompt.split("\n\n# The same code")[0]
    r = {"excerpt_in_training_text": excerpt in corpus_text("train")}  # False: the prompt is held-out text
    spec = {"prompt_lookup": True, "k": 4}
    for target in lookup_targets(args):
        tag = hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()[:10]
        models = load_targets(rtn_bundle(target, work / f"{target.name}-{tag}-rtn"), args)
        model = next((m for m in models.values() if not isinstance(m, str)), None)
        if model is None:
            r[target.name] = {k: {"not_run": m} for k, m in models.items()}
            continue
        row = r[target.name] = {"code_edit": side_by_side(models, [prompt], args.new_tokens, spec, args.repeats)}
        row["prompt_tokens"] = len(model.tokenizer.encode(prompt))
        own = model.generate(prompt, max_new_tokens=args.new_tokens, speculative=False, ignore_eos=True).text
        # how much of the edited copy the model's own greedy continuation reproduces, in characters
        row["copied_chars"] = next((i for i, (a, b) in enumerate(zip(own, expected)) if a != b), min(len(own), len(expected)))
        # the upper bound for a model that does not copy: its own greedy continuation placed in the
        # prompt first (as a model that copies the source would produce it), then asked again
        row["output_in_prompt"] = side_by_side(models, [prompt + own + "\n\n" + prompt], args.new_tokens, spec, args.repeats)
        planner_prediction(row["code_edit"])
        planner_prediction(row["output_in_prompt"])
        close(models)
    return r


def part_pair(work: Path, args) -> dict:
    from train_tiny import DEFAULT_OUT, LARGE_OUT, corpus_text

    if not (LARGE_OUT / "model.safetensors").is_file():
        return {"skipped": f"no larger model in {LARGE_OUT}: run `python scripts/train_tiny.py --size large`"}
    draft_bundle = rtn_bundle(DEFAULT_OUT, work / "tiny-rtn")
    draft = load(draft_bundle)  # resident under every setting: it is small
    models = load_targets(rtn_bundle(LARGE_OUT, work / "large-rtn"), args)
    for m in models.values():
        if not isinstance(m, str):
            m.attach_draft(draft)
    text = corpus_text("eval")
    prompts = [text[i:i + 600] for i in (20_000, 40_000, 60_000)]  # held-out, 3 places
    r = side_by_side(models, prompts, args.new_tokens, {"k": 4}, args.repeats)
    alone = statistics.median(draft.generate(p, max_new_tokens=args.new_tokens, speculative=False, ignore_eos=True).timings.decode_tokens_per_s
                              for p in prompts)
    for row in r.values():
        if "not_run" not in row:
            row["draft_step_ratio"] = round(row["plain_decode_tokens_per_s"] / alone, 3)  # a draft step / a target step
    planner_prediction(r, {k: row.get("draft_step_ratio", 0.0) for k, row in r.items()})
    r["draft_plain_decode_tokens_per_s"] = round(alone, 1)
    r["target_weight_mib"] = round(sum(f.stat().st_size for f in (work / "large-rtn").glob("*.weights")) / 2**20, 2)
    r["draft_weight_mib"] = round(sum(f.stat().st_size for f in draft_bundle.glob("*.weights")) / 2**20, 2)
    close(models)
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
    ap.add_argument("--lookup-target", type=Path, nargs="+", default=None,
                    help="trained model directories measured by `lookup` beside the default tiny model "
                         "(default: scripts/train_tiny.py --size copy's, when trained)")
    ap.add_argument("--target-budget", nargs="+", default=["resident"], metavar="BUDGET",
                    help="target settings measured side by side: resident, a memory budget (bytes or N%% of the "
                         "target's weights, embeddings included) under which the target pages layers from storage, "
                         "or all-paged (the smallest budget the executor runs under: every layer paged) (lookup, pair)")
    ap.add_argument("--emulate", default=None, metavar="BOARD",
                    help="a paged target reads at this board's default storage speed (boards.json)")
    ap.add_argument("--verify-bundle", type=Path, default=Path("/tmp/bench-1.5b/bundle"))
    ap.add_argument("--verify-repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for b in args.target_budget:
        if b not in ("resident", "all-paged") and not (b.isdigit() or re.fullmatch(r"\d+(\.\d+)?%", b)):
            ap.error(f"--target-budget {b}: give resident, all-paged, a byte count or a percentage such as 25%")
    if args.emulate:
        from edge_sdk.boards import get_board
        from edge_sdk.errors import EdgeSDKError

        try:
            get_board(args.emulate)
        except EdgeSDKError as exc:
            ap.error(f"--emulate: {exc}")
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
