"""Constrained vs unconstrained decoding on one bundle, side by side in one run.

    python benchmarks/bench_constrained.py BUNDLE [--tokens 64] [--repeats 3]

Per batch size (1 and 4): decode tokens/s and milliseconds per generated token (wall time after the
first token, so the mask, its application and sampling count, not only the forward pass), free text
vs a JSON schema whose string keeps the model writing; the overhead is the per-token difference.
Then time to first token with a 50-property schema: cold (grammar compiled for the first time) and
warm (the compiled grammar cached).
"""

from __future__ import annotations

import argparse
import json
import time

import edge_sdk
from edge_sdk.runtime.generate.constrain import constraint
from edge_sdk.runtime.generate.generation import GenerationConfig

LONG = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}


def wide_schema(n: int, salt: int) -> dict:
    props = {f"field_{salt}_{i}": {"type": ["integer", "string", "boolean"][i % 3]} for i in range(n)}
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}


def per_token(model, prompts, cfg) -> tuple[float, int]:
    """(seconds per generated token after the first step, over all rows; tokens counted)"""
    first, n = None, 0
    for c in model.generator.stream(prompts, cfg):
        if first is None:
            first = time.perf_counter()
        elif c.token_id is not None:
            n += 1
    return (time.perf_counter() - first) / max(1, n), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = edge_sdk.load(args.bundle)
    rows = []
    for batch in (1, 4):
        prompts = [model.tokenizer.encode(f"Write a note number {i}:") for i in range(batch)]
        for label, c in (("free", None), ("json_schema", constraint(json_schema=LONG))):
            cfg = GenerationConfig(max_new_tokens=args.tokens, temperature=1.0, seed=0, ignore_eos=c is None, constraint=c)
            per_token(model, prompts, cfg)  # warm-up (grammar compiled and cached)
            best = min(per_token(model, prompts, cfg) for _ in range(args.repeats))
            rows.append({"batch": batch, "mode": label, "ms_per_step": round(best[0] * 1e3, 3),
                         "tokens_per_s": round(1 / best[0], 1), "tokens": best[1]})
    for batch in (1, 4):
        free, cons = [r for r in rows if r["batch"] == batch]
        cons["overhead_pct"] = round(100 * (cons["ms_per_step"] / free["ms_per_step"] - 1), 1)
    prompt = [model.tokenizer.encode("Fill in the record:")]
    ttft = {}
    for label in ("cold", "warm"):
        cfg = GenerationConfig(max_new_tokens=1, constraint=constraint(json_schema=wide_schema(50, 0 if label == "warm" else 1)))
        if label == "warm":
            next(iter(model.generator.stream(prompt, cfg)))  # compiles and caches this schema
        t = time.perf_counter()
        next(iter(model.generator.stream(prompt, cfg)))
        ttft[label] = round((time.perf_counter() - t) * 1e3, 1)
    free = GenerationConfig(max_new_tokens=1)
    t = time.perf_counter()
    next(iter(model.generator.stream(prompt, free)))
    ttft["unconstrained"] = round((time.perf_counter() - t) * 1e3, 1)
    print(json.dumps({"decode": rows, "ttft_ms_50_properties": ttft}, indent=1))


if __name__ == "__main__":
    main()
