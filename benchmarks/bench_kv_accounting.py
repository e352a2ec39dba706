"""KV memory counted by the daemon's memory manager against what the process really gained.

Runs the scheduler and the daemon's adapter over numpy KV caches (tests/numpy_step_model.py: the
runtime's KVCache, written as onnxruntime writes it) in this fresh process: one long prompt, then
short requests filling the batch and more that join while rows finish. Prints the peak counted KV
(pool blocks) against the peak resident growth (VmHWM after /proc/self/clear_refs) and the peak bytes
of numpy arrays (tracemalloc). Resident growth can stay below the allocation: pages of a cache's
tail that no token reached are never touched.

    python benchmarks/bench_kv_accounting.py --batch 8 [--layers 8 --kv-heads 2 --head-dim 32] [--context 4096 --long 3800]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MIB = 2**20


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)  # 8 layers x 2 heads x 64 fp32, K and V: 8 KiB/token, two buffers: 16 KiB
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--long", type=int, default=3800)
    ap.add_argument("--pool-mb", type=int, default=8192)
    ap.add_argument("--tracemalloc", action="store_true", help="also trace numpy allocations (slower)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from edge_sdk.runtime.server.engine import SamplingParams
    from edge_sdk.runtime.server.memory import MemoryManager, plan_layout
    from edge_sdk.runtime.server.scheduler import Scheduler
    from numpy_step_model import numpy_step_model

    model = numpy_step_model(layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim, context=args.context,
                             max_batch=args.batch)
    pool = args.pool_mb * MIB
    layout = plan_layout(budget_bytes=pool, reserve_bytes=0, weights_bytes=0, workspace_bytes=0,
                         kv_bytes_per_token=model.kv_bytes_per_token, kv_block_tokens=16, context_length=args.context,
                         kv_pool_max_bytes=pool)
    memory = MemoryManager(layout, context_length=args.context)
    peak = [0]
    allocate = memory.pool.allocate

    def counting(n):  # the most blocks ever counted at once
        blocks = allocate(n)
        peak[0] = max(peak[0], memory.pool.num_used)
        return blocks

    memory.pool.allocate = counting
    sched = Scheduler(model, memory, max_batch=args.batch, queue_timeout_s=3600)
    work = [(args.long, 16)] + [(8 + i % 5, 4 + (i * 7) % 20) for i in range(args.batch + 3)]
    reqs = [sched.submit([1 + (i + j) % 60 for j in range(p)], SamplingParams(max_tokens=m, temperature=0.0))
            for i, (p, m) in enumerate(work)]
    if args.tracemalloc:
        tracemalloc.start()
    traced0 = tracemalloc.get_traced_memory()[0] if args.tracemalloc else 0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rss0, t0 = status_bytes("VmRSS"), time.monotonic()
    sched.start()
    while any(r.finish_reason is None for r in reqs):
        time.sleep(0.01)
    sched.stop()
    result = {
        "batch": args.batch, "kv_bytes_per_token": model.kv_bytes_per_token, "context": args.context, "long": args.long,
        "requests": len(reqs), "finished": sorted({r.finish_reason for r in reqs}),
        "counted_peak_mib": peak[0] * layout.kv_block_bytes / MIB,
        "rss_growth_mib": (status_bytes("VmHWM") - rss0) / MIB,
        "seconds": round(time.monotonic() - t0, 1),
        "counted_after_mib": memory.stats()["kv_blocks_used"] * layout.kv_block_bytes / MIB,
    }
    if args.tracemalloc:
        result["numpy_peak_mib"] = (tracemalloc.get_traced_memory()[1] - traced0) / MIB
    if args.json:
        print(json.dumps(result))
    else:
        print("  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
