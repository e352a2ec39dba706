"""Speed of a loaded model: prefill and decode tokens/s, time to first token, peak memory, bytes
read per decoded token, and the ratio to the memory-bandwidth roofline of this machine."""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time

import numpy as np

from .generation import GenerationConfig


def read_bandwidth_gbps(threads: int | None = None, mb_per_thread: int | None = None, repeats: int = 5) -> float:
    """Sustained read bandwidth with all cores: each thread sums its own buffer (numpy drops the GIL).
    Buffers default to 512 MB per thread (well past server last-level caches; on this machine 128 MB
    per thread read 22-29 GB/s from run to run, 512 MB 27-31), at most 1/8 of the memory in all."""
    threads = threads or len(os.sched_getaffinity(0))
    if mb_per_thread is None:
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
        mb_per_thread = max(64, min(512, total_mb // (8 * threads)))
    bufs = [np.ones(mb_per_thread << 17, np.float64) for _ in range(threads)]  # 8-byte elements
    for b in bufs:
        b.sum()  # fault the pages in
    best = 0.0
    for _ in range(repeats):
        barrier = threading.Barrier(threads + 1)

        def work(b):
            barrier.wait()
            b.sum()

        ts = [threading.Thread(target=work, args=(b,)) for b in bufs]
        for t in ts:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in ts:
            t.join()
        best = max(best, threads * (mb_per_thread << 20) / (time.perf_counter() - start) / 1e9)
    return best


def weight_bytes_per_token(manifest: dict) -> int:
    """Weight bytes one decode step reads: every tensor except the embedding table, of which one row.

    Without a weights table in the manifest, the planner's figure for the source config (int4, group 128).
    """
    tensors = manifest.get("weights", {}).get("tensors", {})
    if not tensors:
        return _planned_read_per_token(manifest.get("source", {}).get("config") or {})
    total = 0
    for name, t in tensors.items():
        if "embed_tokens" in name and not name.endswith("scales"):
            rows = t.get("shape", [1])[0] or 1
            total += t["nbytes"] // rows
        else:
            total += t["nbytes"]
    return total


def _planned_read_per_token(cfg: dict) -> int:
    if not cfg.get("architectures"):
        return 0
    from edge_sdk.modelspec import shape_from_config
    from edge_sdk.planner import QuantSpec, weight_bytes

    return weight_bytes(shape_from_config(cfg, "bundle"), QuantSpec()).read_per_token


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM (ru_maxrss is inherited across fork and exec, so a
    process started by a larger one reports its parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench(model, *, prompt_tokens: int = 128, new_tokens: int = 128, batch: int = 1, repeats: int = 3,
          bandwidth_gbps: float | None = None, seed: int = 0) -> dict:
    """Median over `repeats` runs of a random prompt of exactly `prompt_tokens`, greedy, EOS ignored."""
    rng = np.random.default_rng(seed)
    vocab = min(model.backend.io.vocab_size, model.tokenizer.vocab_size)
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    runs = []
    for _ in range(repeats):
        prompts = [rng.integers(min(100, vocab - 1), vocab, prompt_tokens).tolist() for _ in range(batch)]
        for _ in model.generator.stream(prompts, cfg):
            pass
        runs.append(model.generator.timings)
    med = lambda f: statistics.median(f(t) for t in runs)  # noqa: E731
    decode_tps = med(lambda t: t.decode_tokens_per_s) * batch
    io = model.backend.io
    # what the backend's graph reads (the fused graph: fp32 scales), else the bundle's weights table
    weights = getattr(model.backend, "weight_bytes_per_token", None) or weight_bytes_per_token(model.manifest)
    avg_context = prompt_tokens + new_tokens / 2
    kv = int(io.kv_bytes_per_token() * avg_context * batch)
    per_step = weights + kv
    peak = peak_rss_bytes()  # before the bandwidth probe, whose buffers are not the model's
    bw = bandwidth_gbps if bandwidth_gbps is not None else read_bandwidth_gbps()
    roofline = bw * 1e9 / per_step * batch
    out = {
        "backend": model.backend.describe(),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch": batch, "repeats": repeats,
        "prefill_tokens_per_s": round(med(lambda t: t.prefill_tokens_per_s), 2),
        "decode_tokens_per_s": round(decode_tps, 2),
        "time_to_first_token_s": round(med(lambda t: t.first_token_s), 4),
        "peak_rss_bytes": peak,
        "bytes_read_per_token": per_step // batch,
        "weight_bytes_per_step": weights, "kv_bytes_per_step": kv,
        "read_bandwidth_gbps": round(bw, 2),
        "roofline_tokens_per_s": round(roofline, 2),
        "roofline_ratio": round(decode_tps / roofline, 6) if roofline else None,
        "load_average": list(os.getloadavg()),
    }
    return out


def board_roofline(manifest: dict, board: str, context: int) -> dict:
    """The planner's decode bound for this model on the (emulated) board, per power mode."""
    from edge_sdk.planner import plan

    p = plan(manifest["source"]["config"], board, context=context)
    return {"board": board, "selected_mode": p.selected_mode, "bytes_read_per_token": p.bytes_read_per_token,
            "modes": {m.mode: round(m.decode_tokens_per_s, 1) for m in p.modes}}
