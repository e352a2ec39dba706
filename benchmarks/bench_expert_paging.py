#!/usr/bin/env python
"""Expert paging of a DeepSeek-V2 bundle under memory budgets below its weights.

    python benchmarks/bench_expert_paging.py BUNDLE [--budgets 50,25] [--read-mbps 300,2000,0]
        [--prompt 16] [--new 48] [--json]

BUNDLE: a DeepSeek-V2 / V3 bundle, e.g. the V2-Lite shape that `bench_deepseek_v2.py --keep` builds.
For each budget (percent of the bundle's weight bytes) and emulated storage speed (MB/s; 0 = the disk
as it is), one child process per configuration: the expert cache with LFU-DA and LRU, LFU without
read-ahead, and the naive baseline (every expert use built from an mmap of the weights file, pages
dropped after use). Each run: a seeded random prompt, then greedy decode; the stats are taken over the
decode only. Reported: decode tok/s, cache hit rate, read-ahead hits and waste, bytes read per token,
the storage speed the reads got, and the storage bound from the misses = read speed / bytes of the
chosen experts that were not cached (read on demand or ahead; wasted read-ahead excluded), with the
measured speed as a share of it and of the lower of that bound and the compute bound (the same
executor with every expert cached before the run). The resident runtime (the bundle's QMoE graph, no
budget) is run too.

Random weights route tokens almost uniformly, the worst case for any cache: a trained model's skew
raises every hit rate here. The load average is printed beside each run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, sys, time
import numpy as np
import edge_sdk
from edge_sdk.runtime.paging.experts import ExpertPagedBackend, ExpertPagingOptions
from edge_sdk.runtime.backends.kv_cache import ModelIO
from edge_sdk.runtime.generate.bench import peak_rss_bytes
bundle, budget, mbps, policy, prefetch, io, prompt, new = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7]), int(sys.argv[8])
level = int(sys.argv[9])
from pathlib import Path
root = Path(bundle)
man = json.loads((root / "manifest.json").read_text())
mio = ModelIO.from_manifest(man)
t0 = time.perf_counter()
if budget:
    b = ExpertPagedBackend(root, man, root / "model.onnx", mio, ExpertPagingOptions(budget, mbps * 1e6 or None, policy=policy,
                           prefetch=prefetch, io=io), threads=len(os.sched_getaffinity(0)), accuracy_level=level)
elif policy == "all-cached":  # every expert built and cached before the run: this executor's compute bound
    b = ExpertPagedBackend(root, man, root / "model.onnx", mio, ExpertPagingOptions(1 << 60, prefetch="off"),
                           threads=len(os.sched_getaffinity(0)), accuracy_level=level)
    for j, m in enumerate(b.moe):
        for e in range(b.n_experts):
            b.cache.put((m.layer, e), b._load(j, e))
    budget = 1
else:
    # huge pages off: their background conversion would still be running during a short run
    b = edge_sdk.load(root, provider="cpu", graph="standard", huge_pages=False, accuracy_level=level).backend
load_s = time.perf_counter() - t0
rng = np.random.default_rng(0)
ids = rng.integers(100, mio.vocab_size, (1, prompt))
cache = b.new_cache(1, prompt + new + 1)
la0 = os.getloadavg()[0]
t = time.perf_counter()
logits = b.forward(ids, cache)
prefill_s = time.perf_counter() - t
s0 = dict(vars(b.stats)) if budget else None
t = time.perf_counter()
for _ in range(new):
    logits = b.forward(logits[:, -1].argmax(-1)[:, None], cache)
dt = time.perf_counter() - t
out = {"load_s": round(load_s, 2), "prefill_tokens_per_s": round(prompt / prefill_s, 2), "decode_tokens_per_s": round(new / dt, 3),
       "loadavg": [la0, os.getloadavg()[0]], "peak_rss_bytes": peak_rss_bytes()}
if budget:
    s1 = vars(b.stats)
    d = {k: s1[k] - s0[k] for k in s1}
    out |= {"capacity": b.capacity, "experts": len(b.moe) * b.n_experts, "resident_bytes": b.resident_bytes,
            "decode": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}}
    out["hit_rate"] = round(d["hits"] / d["uses"], 4) if d["uses"] else None
    out["bytes_read_per_token"] = d["bytes_read"] // new
    out["read_mb_per_s"] = round(d["bytes_read"] / d["read_seconds"] / 1e6, 1) if d["read_seconds"] else None
    out["build_ms_per_expert"] = round(d["build_seconds"] / d["reads"] * 1e3, 1) if d["reads"] else None
    b.close()
print(json.dumps(out))
"""


def run(args, budget: int, mbps: float, policy: str, prefetch: str, io: str, level: int = 4) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(args.bundle), str(budget), str(mbps), policy, prefetch, io,
                        str(args.prompt), str(args.new), str(level)], stdout=subprocess.PIPE, text=True)
    if r.returncode:
        return {"error": f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def cold_read_mb_per_s(bundle: Path, nbytes: int = 256 << 20) -> float:
    """Independent probe of the disk: O_DIRECT reads of 4 MiB from the weights file's expert area."""
    import time

    import numpy as np

    m = json.loads((bundle / "manifest.json").read_text())
    t = [v for k, v in m["weights"]["tensors"].items() if ".mlp.experts." in k and k.endswith("qweight")]
    path = bundle / m["weights"]["file"]
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    raw = np.empty((4 << 20) + 4096, np.uint8)
    buf = raw[(-raw.ctypes.data) % 4096:][:4 << 20]
    done, start = 0, time.perf_counter()
    try:
        for s in t:
            off = s["offset"] - s["offset"] % 4096
            end = s["offset"] + s["nbytes"]
            while off + len(buf) <= end and done < nbytes:
                os.preadv(fd, [memoryview(buf)], off)
                off += len(buf)
                done += len(buf)
    finally:
        os.close(fd)
    return done / (time.perf_counter() - start) / 1e6


def equivalent_budget(manifest: dict, pct: int, full_layers: int, loaders: int = 2) -> tuple[int, float]:
    """The budget that gives this cut of the model the expert-cache share the whole model (`full_layers`
    decoder layers, the same per-layer tensors) gets at `pct` % of its weights: (bytes, cache share)."""
    from edge_sdk.runtime.paging.experts import resident_held_bytes

    t = manifest["weights"]["tensors"]
    moe = manifest["architecture"]["moe"]
    e, k = int(moe["n_routed_experts"]), int(moe["num_experts_per_tok"])
    dense = int(moe.get("first_k_dense_replace") or 0)
    layers = int(manifest["architecture"]["num_layers"])

    def part(pred, held=False):
        sel = {n: v for n, v in t.items() if pred(n)}
        return resident_held_bytes(sel) if held else sum(v["nbytes"] for v in sel.values())

    is_expert = lambda n: ".mlp.experts." in n  # noqa: E731
    moe_layer = lambda n: n.startswith(f"model.layers.{dense}.")  # noqa: E731
    other = lambda n: not n.startswith("model.layers.") or any(n.startswith(f"model.layers.{i}.") for i in range(dense))  # noqa: E731
    w_other, w_moe, w_exp = part(other), part(lambda n: moe_layer(n) and not is_expert(n)), part(lambda n: moe_layer(n) and is_expert(n))
    r_other = part(lambda n: other(n) and n != "model.embed_tokens.weight", True)
    r_moe = part(lambda n: moe_layer(n) and not is_expert(n), True)
    g = {n: v for n, v in t.items() if n.startswith(f"model.layers.{dense}.mlp.experts.")}
    qb = sum(v["nbytes"] for n, v in g.items() if n.endswith("qweight")) // e
    sb = sum(v["nbytes"] for n, v in g.items() if n.endswith("scales")) // e
    held, raw = qb + 4 * sb, qb + sb
    in_flight = 2 * max(k, 2 * loaders) * (held + raw)
    n_full, n_cut = full_layers - dense, layers - dense
    w_full = w_other + n_full * (w_moe + w_exp)
    share = (pct / 100 * w_full - r_other - n_full * r_moe - in_flight) / (n_full * e * held)
    share = max(0.0, min(1.0, share))
    budget = r_other + n_cut * r_moe + in_flight + int(round(share * n_cut * e)) * held
    return budget, share


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--budgets", default="50,25", help="percent of the weight bytes, comma separated")
    ap.add_argument("--read-mbps", default="300,0", help="emulated storage speeds in MB/s (0: the disk as it is)")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--no-resident", action="store_true")
    ap.add_argument("--compare-only", action="store_true",
                    help="only the resident QMoE graph against the expert executor with every expert built, at levels 1 and 4")
    ap.add_argument("--full-layers", type=int, default=0,
                    help="budgets as the whole model of this many layers gets them (the same expert-cache share); "
                         "0: percent of this bundle's weights")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    m = json.loads((args.bundle / "manifest.json").read_text())
    weights = sum(t["nbytes"] for t in m["weights"]["tensors"].values())
    results = {"bundle": str(args.bundle), "weight_bytes": weights, "runs": []}
    disk = cold_read_mb_per_s(args.bundle)
    results["disk_cold_read_mb_per_s"] = round(disk, 1)
    if args.compare_only:  # the resident QMoE graph against the expert executor with every expert built, per level
        for level in (1, 4):
            a, b = run(args, 0, 0, "lfu", "off", "reader", level), run(args, 0, 0, "all-cached", "off", "reader", level)
            results[f"level{level}"] = {"resident_qmoe": a, "all_cached_experts": b}
            print(f"accuracy level {level}: resident QMoE graph {a.get('decode_tokens_per_s')} tok/s (prefill "
                  f"{a.get('prefill_tokens_per_s')}), expert executor all cached {b.get('decode_tokens_per_s')} tok/s "
                  f"(prefill {b.get('prefill_tokens_per_s')})  load {a.get('loadavg')} {b.get('loadavg')}", flush=True)
        print(json.dumps(results, indent=1))
        return 0
    if not args.no_resident:
        results["resident"] = run(args, 0, 0, "lfu", "off", "reader")
    # the same executor with every expert cached: what it computes per token when storage costs nothing
    results["all_cached"] = compute = run(args, 0, 0, "all-cached", "off", "reader")
    if not args.json:
        print(f"resident graph: {results.get('resident', {}).get('decode_tokens_per_s')} tok/s   expert executor, all cached: "
              f"{compute.get('decode_tokens_per_s')} tok/s  load {compute.get('loadavg')}", flush=True)
    for pct in (int(x) for x in args.budgets.split(",")):
        budget, share = (equivalent_budget(m, pct, args.full_layers) if args.full_layers else (weights * pct // 100, None))
        for mbps in (float(x) for x in args.read_mbps.split(",")):
            for policy, prefetch, io in (("lfu", "auto", "reader"), ("lru", "auto", "reader"), ("lfu", "off", "reader"),
                                         ("lfu", "on", "reader"), ("lfu", "off", "mmap")):
                if io == "mmap" and mbps:
                    continue  # the page cache is not throttled: the naive baseline runs on the disk as it is
                r = run(args, budget, mbps, policy, prefetch, io)
                speed = (mbps or disk) if io == "reader" else disk
                d = r.get("decode") or {}
                if io == "reader" and d.get("reads"):
                    # the storage bound from the misses: the experts the router chose that were not cached
                    # (read on demand or ahead), at the bytes one expert read takes
                    needed = (d["misses"] + d["prefetch_hits"]) * d["bytes_read"] / d["reads"] / args.new
                    r["needed_bytes_per_token"] = int(needed)
                elif io == "mmap":
                    needed = r.get("bytes_read_per_token") or 0
                else:
                    needed = 0
                if needed:
                    bound = speed * 1e6 / needed
                    r["storage_bound_tokens_per_s"] = round(bound, 3)
                    r["share_of_storage_bound"] = round(r["decode_tokens_per_s"] / bound, 3)
                    if compute.get("decode_tokens_per_s"):
                        lower = min(bound, compute["decode_tokens_per_s"])
                        r["share_of_lower_bound"] = round(r["decode_tokens_per_s"] / lower, 3)
                row = {"budget_percent": pct, "budget_bytes": budget, "full_model_cache_share": share, "storage_mb_per_s": mbps or None, "policy": policy,
                       "prefetch": prefetch, "io": io} | r
                results["runs"].append(row)
                if not args.json:
                    print(f"budget {pct:>3} %  storage {('%g MB/s' % mbps) if mbps else 'disk':>10}  {io:6} {policy} "
                          f"read-ahead {prefetch:4}  decode {r.get('decode_tokens_per_s')} tok/s  "
                          f"hit {r.get('hit_rate')}  read/token {r.get('bytes_read_per_token', 0) / 1e6:.1f} MB  "
                          f"bound {r.get('storage_bound_tokens_per_s')}  share {r.get('share_of_storage_bound')} "
                          f"(of min(storage, all cached): {r.get('share_of_lower_bound')})  "
                          f"reads at {r.get('read_mb_per_s')} MB/s  build ms {r.get('build_ms_per_expert')}  load {r.get('loadavg')}",
                          flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
