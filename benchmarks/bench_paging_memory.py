"""Resident memory of a paged model: load a bundle under a memory budget in this fresh process and print
what the kernel counts (/proc/self/status): the peak during load (VmHWM), the resident set after it
(VmRSS) and how much of that is file pages (RssFile) against the budget. Python and onnxruntime
themselves are included.

    python benchmarks/bench_paging_memory.py BUNDLE [--budget 50%] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys


def status_bytes() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import edge_sdk

    before = status_bytes()
    model = edge_sdk.load(args.bundle, provider="cpu", log_provider=False, memory_budget=args.budget)
    after = status_bytes()
    result = {"budget_bytes": model.backend.options.budget_bytes, "before_load": before, "after_load": after,
              "plan": model.backend.plan.to_dict()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    print(f"budget {mib(result['budget_bytes'])}; before load: resident {mib(before['VmRSS'])}")
    print(f"load: peak {mib(after['VmHWM'])}; after: resident {mib(after['VmRSS'])} "
          f"(anonymous {mib(after['RssAnon'])}, file pages {mib(after['RssFile'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
