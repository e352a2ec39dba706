"""The runtime's read-bandwidth probe against an independent reader, side by side in one run.

The independent reader is a C program compiled here from the text below (gcc -O3 -march=native,
256-bit vector loads, one pthread per core, each ORing its own slice of one buffer). A pass lasts
from the first thread's start to the last one's end, each thread taking its own clock, in both. Both read the
same amount (default 1 GiB, past the last-level cache), both on buffers written first and advised
for huge pages (numpy advises them for large arrays). Rounds alternate the readers, so load changes
hit both alike; each prints its best pass per round and the load average beside it. On a shared
machine single passes vary with the others' load: compare medians over rounds.

    python benchmarks/bench_read_bandwidth.py [--rounds 5] [--mib 1024] [--threads N] [--json]

Needs gcc for the C reader. The float64 `sum` the probe used before is printed too, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edge_sdk.runtime.generate.bench import READ_KERNELS, last_level_cache_bytes, split_for_threads, timed_read

READER_C = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
typedef uint64_t v4 __attribute__((vector_size(32)));  /* one AVX2 register */
typedef struct { const v4 *p; size_t n; uint64_t acc; double start, end; } job_t;
static pthread_barrier_t bar;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static void *work(void *arg) {  /* each thread clocks its own span */
  job_t *j = arg;
  v4 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
  pthread_barrier_wait(&bar);
  j->start = now();
  for (size_t i = 0; i < j->n; i += 4) {
    a0 |= j->p[i]; a1 |= j->p[i + 1]; a2 |= j->p[i + 2]; a3 |= j->p[i + 3];
  }
  v4 a = a0 | a1 | a2 | a3;
  j->acc = a[0] | a[1] | a[2] | a[3];
  j->end = now();
  return 0;
}
int main(int argc, char **argv) {  /* reader THREADS MIB PASSES: one GB/s line per pass */
  int threads = atoi(argv[1]), passes = atoi(argv[3]);
  size_t per = ((size_t)atol(argv[2]) << 20) / threads / 128 * 128, huge = 2 << 20;
  size_t total = (per * threads + huge - 1) / huge * huge;
  char *buf = aligned_alloc(huge, total);
  if (!buf || threads < 1 || threads > 256) return 2;
  madvise(buf, total, MADV_HUGEPAGE);
  memset(buf, 1, total);  /* every page faulted in */
  job_t jobs[256]; pthread_t tid[256];
  for (int p = 0; p < passes; p++) {
    pthread_barrier_init(&bar, 0, threads);
    for (int t = 0; t < threads; t++) {
      jobs[t].p = (const v4 *)(buf + t * per); jobs[t].n = per / sizeof(v4);
      pthread_create(tid + t, 0, work, jobs + t);
    }
    uint64_t check = 0;
    double s = 1e300, e = 0;
    for (int t = 0; t < threads; t++) {
      pthread_join(tid[t], 0);
      check |= jobs[t].acc;
      s = jobs[t].start < s ? jobs[t].start : s;
      e = jobs[t].end > e ? jobs[t].end : e;
    }
    pthread_barrier_destroy(&bar);
    if (check != 0x0101010101010101ULL) return 3;  /* every byte was read as written */
    printf("%.3f\n", per * threads / (e - s) / 1e9);
  }
  return 0;
}
"""


def compile_reader(workdir: Path) -> Path:
    src, exe = workdir / "reader.c", workdir / "reader"
    src.write_text(READER_C)
    subprocess.run(["gcc", "-O3", "-march=native", "-pthread", str(src), "-o", str(exe)], check=True)
    return exe


def c_reader_gbps(exe: Path, threads: int, mib: int, passes: int) -> float:
    out = subprocess.run([str(exe), str(threads), str(mib), str(passes)], capture_output=True, text=True, check=True)
    return max(float(line) for line in out.stdout.split())


def numpy_gbps(kernel, slices, passes: int) -> float:
    nbytes = sum(s.nbytes for s in slices)
    return max(nbytes / timed_read(kernel, slices)[0] / 1e9 for _ in range(passes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--passes", type=int, default=3, help="passes per kernel per round (the C reader: per kernel of the probe); the best is kept")
    ap.add_argument("--mib", type=int, default=1024, help="buffer size, all threads together")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    per_thread = (args.mib << 18) // args.threads // 2 * 2  # float32 elements, even for the int64 view
    buf = np.full(per_thread * args.threads, 1.0, np.float32)
    slices = split_for_threads(buf, args.threads)
    readers = {f"probe {name}": (lambda k=k: numpy_gbps(k, slices, args.passes)) for name, k in READ_KERNELS.items()}
    readers["old probe (float64 sum)"] = lambda: numpy_gbps(lambda b: b.view(np.float64).sum(), slices, args.passes)
    with tempfile.TemporaryDirectory() as tmp:
        exe = compile_reader(Path(tmp))
        # as many passes as the probe takes over all its kernels
        readers["C reader"] = lambda: c_reader_gbps(exe, args.threads, args.mib, args.passes * len(READ_KERNELS))
        rounds = []
        for _ in range(args.rounds):
            row = {"load_1min": os.getloadavg()[0]}
            row.update({name: round(f(), 2) for name, f in readers.items()})
            row["probe"] = max(row[f"probe {name}"] for name in READ_KERNELS)  # what read_bandwidth_gbps keeps
            rounds.append(row)
            if not args.json:
                print("  ".join(f"{k} {v:.1f}" if k != "load_1min" else f"load {v:.2f}" for k, v in row.items()), flush=True)
    names = [k for k in rounds[0] if k != "load_1min"]
    summary = {k: {"median": round(statistics.median(r[k] for r in rounds), 2), "best": max(r[k] for r in rounds)} for k in names}
    result = {"threads": args.threads, "mib": args.mib, "last_level_cache_mib": last_level_cache_bytes() >> 20,
              "rounds": rounds, "summary": summary}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.threads} threads, {args.mib} MiB, last-level cache {result['last_level_cache_mib']} MiB; "
          f"GB/s over {args.rounds} rounds of best-of-{args.passes}:")
    for k, s in summary.items():
        print(f"  {k:26s} median {s['median']:5.1f}  best {s['best']:5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
