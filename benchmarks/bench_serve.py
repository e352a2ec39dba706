"""Serving throughput: total decode tokens/s with 1, 2, 4 concurrent streams, and TTFT p50/p95.

Starts the real daemon (`edge-sdk serve`, emulated board) on an ephemeral port, drives it with the
official openai client from N threads, and reports per concurrency:
  decode_tokens_per_s  sum over streams of (tokens - 1) / (last token time - first token time),
                       averaged over rounds: what batched decode delivers once streams are running
  throughput_tokens_per_s  all generated tokens / wall time of the round (prefill included)
  server_decode_tokens_per_s  from the daemon's /metrics: tokens of batched decode steps / time in
                       them (prefill stalls excluded): what batching itself delivers
  ttft_p50_s / ttft_p95_s  request sent -> first text chunk (client side)
  server_ttft_mean_s   arrival -> first token, from the daemon's TTFT histogram (also right when
                       a random-weight model's tokens decode to no text)

With --prompt-lookup or --draft BUNDLE the daemon speculates while one stream runs (docs/serve.md)
and every round runs twice, interleaved: requests with "speculative": false (plain batched decode)
and requests left to the daemon's rule (speculative steps at batch 1, batched steps otherwise); the
rows put both side by side with the acceptance counted by the daemon. --workload code gives prompt
lookup something to copy: code-editing prompts from the trained tiny model's held-out text
(benchmarks/bench_speculative.py); --workload text: plain held-out excerpts (a draft/target pair).

    python benchmarks/bench_serve.py --bundle BUNDLE [--streams 1,2,4] [--max-tokens 64] [--json]
    python benchmarks/bench_serve.py --bundle /tmp/edge-sdk-bench-spec/tiny-rtn --prompt-lookup --workload code --streams 1,2,4
    python benchmarks/bench_serve.py --bundle /tmp/edge-sdk-bench-spec/large-rtn --draft /tmp/edge-sdk-bench-spec/tiny-rtn --workload text
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def start_daemon(bundle: str, board: str, max_batch: int, context: int | None, extra: tuple = ()) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "edge_sdk.cli.main", "serve", "--bundle", bundle, "--port", "0", "--emulate", board,
           "--max-batch", str(max_batch), *extra]
    if context:
        cmd += ["--context", str(context)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        sys.stderr.write("  daemon: " + line)
        m = re.search(r"listening on (\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m.group(1)
    raise SystemExit(f"the daemon exited with {proc.wait()} before listening")


def one_stream(client, model: str, prompt: str, max_tokens: int, out: list, extra_body: dict | None = None) -> None:
    t0 = time.perf_counter()
    stamps = []
    tokens = 0
    for ch in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body=extra_body):
        if ch.choices and ch.choices[0].text:
            stamps.append(time.perf_counter())
        if ch.usage:
            tokens = ch.usage.completion_tokens
    out.append({"ttft": stamps[0] - t0 if stamps else float("nan"), "first": stamps[0] if stamps else t0,
                "last": stamps[-1] if stamps else t0, "tokens": tokens})


def round_of(client, model: str, n: int, prompts: list[str], max_tokens: int, extra_body: dict | None = None) -> dict:
    out: list = []
    threads = [threading.Thread(target=one_stream, args=(client, model, prompts[i % len(prompts)], max_tokens, out, extra_body))
               for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    decode = sum((r["tokens"] - 1) / (r["last"] - r["first"]) for r in out if r["tokens"] > 1 and r["last"] > r["first"])
    return {"decode_tokens_per_s": decode, "throughput_tokens_per_s": sum(r["tokens"] for r in out) / wall,
            "ttfts": [r["ttft"] for r in out], "tokens": sum(r["tokens"] for r in out)}


def decode_counters(url: str) -> tuple[float, float, float, float]:
    """(seconds in decode steps, tokens they produced, TTFT sum, TTFT count) from the daemon's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        values = dict(l.rsplit(" ", 1) for l in r.read().decode().splitlines() if l and not l.startswith("#"))
    return tuple(float(values[f"edge_sdk_{k}"]) for k in ("decode_seconds_total", "decode_step_tokens_total",
                                                           "ttft_seconds_sum", "ttft_seconds_count"))


def spec_counters(url: str) -> tuple[float, float, float]:
    """(speculative steps, draft tokens proposed, accepted) from the daemon's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        values = dict(l.rsplit(" ", 1) for l in r.read().decode().splitlines() if l and not l.startswith("#"))
    return tuple(float(values[f"edge_sdk_speculative_{k}_total"]) for k in ("steps", "proposed_tokens", "accepted_tokens"))


def held_out_prompts(kind: str) -> list[str]:
    """Four prompts from the trained tiny model's held-out text: code-editing prompts (a source excerpt, a
    rename instruction, the first lines of the copy) or plain 600-character excerpts."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_speculative import code_edit_prompt
    from train_tiny import corpus_text

    text = corpus_text("eval")
    if kind == "text":
        return [text[i:i + 600] for i in (20_000, 40_000, 60_000, 80_000)]
    rows = text.splitlines()
    return [code_edit_prompt("\n".join(rows[start:]))[0] for start in (0, 500, 1000, 1500)]


def speculation_rows(client, model: str, url: str, streams: list[int], prompts: list[str], args) -> list[dict]:
    """Per concurrency: plain (speculative: false) and the daemon's rule, interleaved round by round."""
    rows = []
    for n in streams:
        off, on, spec = [], [], [0.0, 0.0, 0.0]
        for _ in range(args.rounds):
            off.append(round_of(client, model, n, prompts, args.max_tokens, {"speculative": False}))
            c0 = spec_counters(url)
            on.append(round_of(client, model, n, prompts, args.max_tokens))
            spec = [a + b - c for a, b, c in zip(spec, spec_counters(url), c0)]
        row = {"streams": n}
        for name, rs in (("plain", off), ("speculative", on)):
            row[f"{name}_decode_tokens_per_s"] = round(statistics.median(r["decode_tokens_per_s"] for r in rs), 1)
            row[f"{name}_throughput_tokens_per_s"] = round(statistics.median(r["throughput_tokens_per_s"] for r in rs), 1)
        row["decode_speedup"] = round(row["speculative_decode_tokens_per_s"] / row["plain_decode_tokens_per_s"], 3)
        row["throughput_speedup"] = round(row["speculative_throughput_tokens_per_s"] / row["plain_throughput_tokens_per_s"], 3)
        row["speculative_steps"], row["acceptance_rate"] = int(spec[0]), round(spec[2] / max(1, spec[1]), 3)
        row["speculative_share_of_tokens"] = round((spec[0] + spec[2]) / max(1, sum(r["tokens"] for r in on)), 3)
        rows.append(row)
        if not args.json:
            print(json.dumps(row), flush=True)
    return rows


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    import openai

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--board", default="agx-orin-64gb", help="emulated board")
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, help="tokens per sequence (default: the bundle's, at most 4096)")
    ap.add_argument("--prompt-lookup", action="store_true", help="the daemon speculates with prompt lookup; plain vs speculative rows")
    ap.add_argument("--draft", metavar="BUNDLE", help="the daemon speculates with this draft; plain vs speculative rows")
    ap.add_argument("--spec-k", type=int, default=4)
    ap.add_argument("--workload", choices=("chat", "code", "text"), default="chat",
                    help="chat: four questions; code: code-editing prompts; text: held-out text excerpts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]
    prompts = ["Explain how a Jetson shares memory between CPU and GPU.", "Write a haiku about edge computing.",
               "List three uses of a language model on a robot.", "What limits decode speed on a small device?"]
    if args.workload != "chat":
        prompts = held_out_prompts(args.workload)
    spec = ("--prompt-lookup",) if args.prompt_lookup else ("--draft", args.draft) if args.draft else ()

    proc, url = start_daemon(args.bundle, args.board, max(streams), args.context, (*spec, "--spec-k", str(args.spec_k)) if spec else ())
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        round_of(client, model, 1, prompts, 8)  # warm-up
        if spec:
            rows = speculation_rows(client, model, url, streams, prompts, args)
            report = {"bundle": args.bundle, "speculation": " ".join(spec), "k": args.spec_k, "workload": args.workload,
                      "max_tokens": args.max_tokens, "rounds": args.rounds, "load_avg": os.getloadavg(), "cpus": os.cpu_count(),
                      "rows": rows}
            print(json.dumps(report, indent=2))
            return 0
        rows = []
        for n in streams:
            s0, t0, f0, n0 = decode_counters(url)
            rs = [round_of(client, model, n, prompts, args.max_tokens) for _ in range(args.rounds)]
            s1, t1, f1, n1 = decode_counters(url)
            ttfts = [t for r in rs for t in r["ttfts"]]
            rows.append({"streams": n, "decode_tokens_per_s": round(statistics.mean(r["decode_tokens_per_s"] for r in rs), 2),
                         "throughput_tokens_per_s": round(statistics.mean(r["throughput_tokens_per_s"] for r in rs), 2),
                         "server_decode_tokens_per_s": round((t1 - t0) / (s1 - s0), 2) if s1 > s0 else None,
                         "server_ttft_mean_s": round((f1 - f0) / (n1 - n0), 4) if n1 > n0 else None,
                         "ttft_p50_s": round(percentile(ttfts, 0.5), 4), "ttft_p95_s": round(percentile(ttfts, 0.95), 4),
                         "tokens": sum(r["tokens"] for r in rs)})
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            batch_lines = [l for l in r.read().decode().splitlines() if l.startswith("edge_sdk_decode_batch_size_")]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    base = rows[0]["decode_tokens_per_s"] or float("nan")
    server_base = rows[0]["server_decode_tokens_per_s"] or float("nan")
    for row in rows:
        row["speedup_vs_1"] = round(row["decode_tokens_per_s"] / base, 2)
        row["server_speedup_vs_1"] = round((row["server_decode_tokens_per_s"] or float("nan")) / server_base, 2)
    report = {"bundle": args.bundle, "board": args.board, "max_tokens": args.max_tokens, "rounds": args.rounds,
              "load_avg": os.getloadavg(), "cpus": os.cpu_count(), "daemon_exit": code, "rows": rows,
              "batch_histogram": batch_lines}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.bundle} on emulated {args.board}, {args.max_tokens} tokens/stream, {args.rounds} rounds, "
              f"load {report['load_avg'][0]:.2f} on {report['cpus']} CPUs")
        print("streams  decode tok/s  speedup  step-only tok/s  speedup  throughput tok/s  TTFT p50   TTFT p95")
        for r in rows:
            print(f"{r['streams']:>7} {r['decode_tokens_per_s']:>13.1f} {r['speedup_vs_1']:>8.2f} {r['server_decode_tokens_per_s'] or 0:>16.1f}"
                  f" {r['server_speedup_vs_1']:>8.2f} {r['throughput_tokens_per_s']:>17.1f} {r['ttft_p50_s']:>8.3f} s {r['ttft_p95_s']:>8.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
