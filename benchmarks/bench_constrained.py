"""Constrained vs unconstrained decoding on one bundle, side by side in one run.

    python benchmarks/bench_constrained.py BUNDLE [--tokens 64] [--repeats 3] [--json]

The 1.5B shape: `python benchmarks/bench_decode.py prepare --workdir W --skip peer peer-graph
--convert-options '{"method": "rtn"}'` builds W/bundle (random weights, DeepSeek's tokenizer).

Per batch size (1 and 4), free text and a JSON schema run interleaved (free, schema, free, schema...)
and every run generates exactly --tokens tokens per row: free text ignores EOS, and the schema's one
string has a minLength no run can reach, so the grammar can neither end nor allow EOS. Reported: the
median milliseconds per decode step after the first token (the mask wait, its application, sampling
and the forward pass all count) and the per-token overhead. A profile pass then splits the schema
runs' matcher time: waiting for the mask (computed on a worker thread during the forward pass),
applying it to the logits, advancing the grammar. Then time to first token with a 50-property schema,
cold (compiled for the first time) and warm (compiled grammar cached), --repeats each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import edge_sdk
from edge_sdk.runtime.generate import constrain
from edge_sdk.runtime.generate.constrain import constraint
from edge_sdk.runtime.generate.generation import GenerationConfig


def endless_schema(tokens: int, longest_token: int) -> dict:
    """One string no run of `tokens` tokens can finish: the grammar never completes nor allows EOS."""
    note = {"type": "string", "minLength": tokens * longest_token + 1}
    return {"type": "object", "properties": {"note": note}, "required": ["note"], "additionalProperties": False}


def wide_schema(n: int, salt: int) -> dict:
    props = {f"field_{salt}_{i}": {"type": ["integer", "string", "boolean"][i % 3]} for i in range(n)}
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}


def one_run(model, prompts, cfg) -> tuple[float, int]:
    """(seconds per decode step after the first token, tokens generated over all rows)"""
    first, n = None, 0
    for c in model.generator.stream(prompts, cfg):
        if c.token_id is None:
            continue
        n += 1
        if first is None:
            first = time.perf_counter()
    return (time.perf_counter() - first) / (cfg.max_new_tokens - 1), n


class MatcherClock:
    """Seconds spent in Matcher.allowed (waiting for the prefetched mask; apply calls it first), the rest of
    apply (masking the logits) and accept (advancing the grammar)."""

    def __init__(self):
        self.seconds = {"mask_wait": 0.0, "apply": 0.0, "accept": 0.0}
        self.calls = 0
        self._orig = {}

    def __enter__(self):
        M = constrain.Matcher
        for name, key in (("allowed", "mask_wait"), ("apply", "apply"), ("accept", "accept")):
            orig = self._orig[name] = getattr(M, name)
            setattr(M, name, self._timed(orig, key))
        return self

    def _timed(self, fn, key):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[key] += time.perf_counter() - t
                self.calls += key == "accept"
        return wrapper

    def per_token_ms(self) -> dict:
        s = dict(self.seconds)
        s["apply"] -= s["mask_wait"]  # apply's own work, its wait for the mask counted once
        return {k: round(v * 1e3 / max(1, self.calls), 4) for k, v in s.items()}

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(constrain.Matcher, name, fn)


def decode_rows(model, tokens: int, repeats: int, longest: int) -> tuple[list, dict]:
    rows, profile = [], {}
    schema = constraint(json_schema=endless_schema(tokens, longest))
    for batch in (1, 4):
        prompts = [model.tokenizer.encode(f"Write a note number {i}:") for i in range(batch)]
        cfgs = {"free": GenerationConfig(max_new_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True),
                "json_schema": GenerationConfig(max_new_tokens=tokens, temperature=1.0, seed=0, constraint=schema)}
        for cfg in cfgs.values():
            one_run(model, prompts, cfg)  # warm-up (grammar compiled and cached)
        runs = {label: [] for label in cfgs}
        for _ in range(repeats):
            for label, cfg in cfgs.items():
                s, n = one_run(model, prompts, cfg)
                if n != batch * tokens:
                    raise SystemExit(f"{label} batch {batch} generated {n} tokens, not {batch * tokens}")
                runs[label].append(s)
        for label, ss in runs.items():
            ms = statistics.median(ss) * 1e3
            rows.append({"batch": batch, "mode": label, "ms_per_step": round(ms, 2),
                         "tokens_per_s": round(1e3 * batch / ms, 2), "tokens_per_row": tokens,
                         "steps_ms_all": [round(s * 1e3, 2) for s in ss]})
        free, cons = rows[-2], rows[-1]
        cons["overhead_pct"] = round(100 * (cons["ms_per_step"] / free["ms_per_step"] - 1), 2)
        with MatcherClock() as clock:
            one_run(model, prompts, cfgs["json_schema"])
        per = clock.per_token_ms()
        step = batch * sum(per.values())
        profile[f"batch_{batch}"] = {**per, "unit": "ms per generated token",
                                     "matcher_ms_per_step": round(step, 3),
                                     "matcher_share_of_free_step_pct": round(100 * step / free["ms_per_step"], 2)}
    return rows, profile


def ttft(model, repeats: int) -> dict:
    prompt = [model.tokenizer.encode("Fill in the record:")]
    out = {"cold": [], "warm": [], "unconstrained": []}
    for i in range(repeats):
        for label in out:
            c = None if label == "unconstrained" else constraint(json_schema=wide_schema(50, 0 if label == "warm" else 1000 + i))
            cfg = GenerationConfig(max_new_tokens=1, constraint=c)
            if label == "warm" and i == 0:
                next(iter(model.generator.stream(prompt, cfg)))  # compiles and caches this schema
            t = time.perf_counter()
            next(iter(model.generator.stream(prompt, cfg)))
            out[label].append(round((time.perf_counter() - t) * 1e3, 1))
    return {k: {"median": statistics.median(v), "all": v} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    load_before = os.getloadavg()
    model = edge_sdk.load(args.bundle)
    tok = model.tokenizer
    longest = max(len(tok.decode([i])) for i in range(tok.vocab_size))
    t = time.perf_counter()
    first = constraint(json_schema=wide_schema(50, 999))
    next(iter(model.generator.stream([tok.encode("Fill in the record:")], GenerationConfig(max_new_tokens=1, constraint=first))))
    first_ms = round((time.perf_counter() - t) * 1e3, 1)  # the tokenizer's grammar view is built here, once per model
    rows, profile = decode_rows(model, args.tokens, args.repeats, longest)
    result = {"machine": {"cpus": len(os.sched_getaffinity(0)), "load_before": [round(x, 2) for x in load_before],
                          "load_after": [round(x, 2) for x in os.getloadavg()]},
              "vocab": {"tokenizer": tok.vocab_size, "logits": model.generator.backend.io.vocab_size},
              "decode": rows, "matcher_profile": profile,
              "ttft_ms_50_properties": ttft(model, args.repeats),
              "first_constrained_request_ms": first_ms}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
