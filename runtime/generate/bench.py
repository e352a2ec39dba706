"""Speed of a loaded model: prefill and decode tokens/s, time to first token, peak memory, bytes
read per decoded token, and the ratio to the memory-bandwidth roofline of this machine."""

from __future__ import annotations

import glob
import os
import resource
import statistics
import threading
import time

import numpy as np

from .generation import GenerationConfig


def last_level_cache_bytes(cpu_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Size of cpu0's highest cache level in bytes (0 where sysfs does not say)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best = (0, 0)
    for index in glob.glob(os.path.join(cpu_dir, "index*")):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "size")) as f:
                size = f.read().strip()  # e.g. "32768K"
            n = int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size)
        except (OSError, ValueError):
            continue
        best = max(best, (level, n))
    return best[1]


# Read kernels, each one pass over a float32 buffer, vectorised and free of the GIL: BLAS's dot of the
# buffer with itself (one stream: the second operand's loads hit L1) and numpy's SIMD max over int64.
# A float64 sum is not among them: its pairwise summation is compute-bound near half the memory limit.
READ_KERNELS = {
    "dot": lambda b: float(np.dot(b, b)),
    "max": lambda b: int(np.maximum.reduce(b.view(np.int64))),
}


def split_for_threads(buf: np.ndarray, threads: int) -> list[np.ndarray]:
    """`threads` contiguous slices covering `buf` (float32, length a multiple of 2 * threads)."""
    return np.split(buf, threads)


def default_mb_per_thread(threads: int, memory_mb: int, llc_mb: int) -> int:
    """MiB each probe thread reads: 512, at most 1/8 of the memory in all, but never under 64 nor
    under 4x the last-level cache in all (a buffer that fits the cache measures the cache)."""
    return max(64, -(-4 * llc_mb // threads), min(512, memory_mb // (8 * threads)))


def timed_read(kernel, slices: list[np.ndarray]) -> tuple[float, list]:
    """One pass: every slice read by its own thread at once. Returns (seconds from the first thread's
    start to the last one's end, each slice's result). Each thread takes its own clock: a clock taken
    by the caller after the threads are released misses reading done before it is scheduled again."""
    barrier = threading.Barrier(len(slices))
    results: list = [None] * len(slices)
    spans = [(0.0, 0.0)] * len(slices)

    def work(i):
        barrier.wait()
        start = time.perf_counter()
        results[i] = kernel(slices[i])
        spans[i] = (start, time.perf_counter())

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(slices))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return max(e for _, e in spans) - min(s for s, _ in spans), results


def read_bandwidth_gbps(threads: int | None = None, mb_per_thread: int | None = None, repeats: int = 5) -> float:
    """Sustained read bandwidth with all cores, GB/s: each thread reads its own slice of one buffer with
    each of READ_KERNELS; the best pass wins (every pass is a lower bound; on a shared machine others'
    work only slows a pass). The buffer (default_mb_per_thread) is written first, so every page is
    faulted in."""
    threads = threads or len(os.sched_getaffinity(0))
    if mb_per_thread is None:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
        mb_per_thread = default_mb_per_thread(threads, memory_mb, last_level_cache_bytes() >> 20)
    buf = np.full(threads * (mb_per_thread << 18), 1.0, np.float32)  # 4-byte elements, pages faulted in
    slices = split_for_threads(buf, threads)
    best = 0.0
    for _ in range(repeats):
        for kernel in READ_KERNELS.values():
            seconds, _ = timed_read(kernel, slices)
            best = max(best, buf.nbytes / seconds / 1e9)
    return best


def roofline_share_text(ratio: float | None) -> str:
    """A decode speed as a share of the probed bound; above 100 % the probe under-read, and says so."""
    if ratio is None:
        return "no bound (nothing read per token)"
    text = f"{100 * ratio:.0f} % of the probed bound"
    return text + ": the bandwidth probe under-reads" if ratio > 1 else text


def weight_bytes_per_token(manifest: dict) -> int:
    """Weight bytes one decode step reads: every tensor except the embedding table, of which one row, and
    of the routed experts (MoE) the token's top-k: num_experts_per_tok / n_routed_experts of them.

    Without a weights table in the manifest, the planner's figure for the source config (int4, group 128).
    """
    tensors = manifest.get("weights", {}).get("tensors", {})
    config = manifest.get("source", {}).get("config") or {}
    if not tensors:
        return _planned_read_per_token(config)
    total = routed = 0
    for name, t in tensors.items():
        if "embed_tokens" in name and not name.endswith("scales"):
            rows = t.get("shape", [1])[0] or 1
            total += t["nbytes"] // rows
        elif ".mlp.experts." in name and config.get("n_routed_experts"):
            routed += t["nbytes"]
        else:
            total += t["nbytes"]
    if routed:
        experts = int(config["n_routed_experts"])
        total += routed * min(experts, int(config.get("num_experts_per_tok") or experts)) // experts
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
        "bandwidth_probe_under_reads": bool(roofline) and decode_tps > roofline,
        "load_average": list(os.getloadavg()),
    }
    return out


def board_roofline(manifest: dict, board: str, context: int) -> dict:
    """The planner's decode bound for this model on the (emulated) board, per power mode."""
    from edge_sdk.planner import plan

    p = plan(manifest["source"]["config"], board, context=context)
    return {"board": board, "selected_mode": p.selected_mode, "bytes_read_per_token": p.bytes_read_per_token,
            "modes": {m.mode: round(m.decode_bound_tokens_per_s, 1) for m in p.modes}}
