"""Paged decode speed of a DeepSeek-R1-Distill-Qwen-1.5B-shaped bundle at a memory budget of 50% of
its weights, against the bound min(storage read bandwidth / bytes paged per token, resident speed)
measured in the same run, against the executor's own estimate (edge_sdk.paging_model), and
against naive mmap of the same file under the same budget (pages dropped after use, see naive_mmap.py).

    python benchmarks/bench_paging.py --bundle /path/to/bundle          # an existing bundle
    python benchmarks/bench_paging.py --workdir /tmp/bench-1.5b [--layers 4 --vocab 32000]   # build one first

Storage bandwidth is measured with the reader itself (O_DIRECT where the filesystem allows it, so the
page cache is out of the measurement). The machine is shared: the load average is printed beside
every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def storage_bandwidth(backend, passes: int = 5) -> dict:
    """Bytes/s of cold aligned reads of the layers the plan pages, through the backend's own file: the
    median of `passes` passes (single passes vary by tens of percent on a shared virtual disk)."""
    from edge_sdk.runtime.paging.buffers import Ledger

    wf, plan = backend.file, backend.plan
    buf = Ledger(plan.slot_bytes or 1).aligned("probe", plan.slot_bytes)
    spans = getattr(backend, "spans", None) or backend.layers
    runs = []
    for _ in range(passes):
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(wf.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0, n = time.perf_counter(), 0
        for i in plan.paged:
            off, nb = spans[i]
            wf.read_into(buf, off, nb)
            n += nb
        runs.append(n / (time.perf_counter() - t0))
    return {"bytes": n, "bytes_per_s": statistics.median(runs), "runs_bytes_per_s": [round(r) for r in runs], "io": wf.mode}


def session_builds(backend, samples: int = 4) -> tuple[float, float]:
    """(median seconds to build one paged layer's session from memory, sessions built per second with
    as many builder threads as the executor runs): onnxruntime prepacks the weights in each build."""
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    from edge_sdk.runtime.paging.buffers import Ledger

    plan = backend.plan
    layers = plan.paged[:samples]
    bufs = {}
    for i in layers:
        off, nb = backend.spans[i]
        bufs[i] = Ledger(plan.slot_bytes).aligned("probe", plan.slot_bytes)
        backend.file.read_into(bufs[i], off, nb)
    times = []
    for i in layers:
        t0 = time.perf_counter()
        sess = backend._layer_session(i, bufs[i], backend.spans[i][0])
        times.append(time.perf_counter() - t0)
        del sess
    builders = max(1, min(plan.sessions - 1, len(os.sched_getaffinity(0)))) if plan.sessions > 1 else 1
    t0 = time.perf_counter()
    with ThreadPoolExecutor(builders) as pool:
        list(pool.map(lambda i: backend._layer_session(i, bufs[i], backend.spans[i][0]) and None, layers))
    return statistics.median(times), len(layers) / (time.perf_counter() - t0)


def decode(model, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    import resource

    from edge_sdk.runtime.generate.bench import bench

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    c0 = cpu()
    r = bench(model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats, bandwidth_gbps=1.0)
    out = {k: r[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s", "load_average")}
    # the process's CPU time per generated token, the prompt's forward pass included (all threads)
    out["cpu_s_per_token"] = round((cpu() - c0) / (repeats * new_tokens), 4)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="an existing bundle (else one is built in --workdir)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edge-sdk-bench-1.5b"))
    ap.add_argument("--layers", type=int, help="reduced shape: real layer shapes, this many layers")
    ap.add_argument("--vocab", type=int, help="reduced shape: this vocab size")
    ap.add_argument("--budget", default="50%", help="memory budget, bytes or percent of the weights")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--cache-root", help="where the split graphs go (default: beside the bundle)")
    ap.add_argument("--emulate", help="board whose storage speed the reader is throttled to (and the planner uses)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import edge_sdk
    from edge_sdk.runtime.loader import graph_file
    from edge_sdk.runtime.generate.model import Model
    from edge_sdk.runtime.paging.backend import PagedBackend, PagingOptions
    from edge_sdk.paging_model import BuildProbe, parse_budget
    from edge_sdk.runtime.paging.select import weight_bytes

    bundle = args.bundle
    if bundle is None:
        from bench_decode import build_ours, make_hf_dir

        hf = make_hf_dir(args.workdir / "hf", layers=args.layers, vocab=args.vocab)
        bundle = build_ours(hf, args.workdir / "bundle")
    common = dict(provider="cpu", accuracy_level=args.accuracy_level, log_provider=False)
    resident = edge_sdk.load(bundle, **common)
    weights = weight_bytes(resident.manifest)
    resident_manifest = resident.manifest
    budget = parse_budget(args.budget, weights)
    result = {"bundle": str(bundle), "weights_bytes": weights, "budget_bytes": budget,
              "load_before": list(os.getloadavg())}
    result["resident"] = decode(resident, args.prompt_tokens, args.new_tokens, args.repeats)
    del resident

    def paged_model(budget_bytes: int, fuse: bool = True, io: str = "reader"):
        m = edge_sdk.load(bundle, **common)  # verified manifest + tokenizer; the backend is replaced
        be = PagedBackend(m.bundle, m.manifest, graph_file(m.manifest, "fp32", m.bundle), m.backend.io,
                          PagingOptions(budget_bytes, cache_root=args.cache_root, fuse_resident=fuse, io=io), providers=["CPUExecutionProvider"],
                          threads=m.options.num_threads, accuracy_level=args.accuracy_level)
        return Model(m.bundle, m.manifest, be, m.tokenizer, m.options)

    # the default executor (fused graph): paged layers get a session prepacked from the slot per use
    paged = edge_sdk.load(bundle, memory_budget=budget, emulate=args.emulate, **common)
    be = paged.backend
    result["executor"] = type(be).__name__
    result["plan"] = be.plan.to_dict()
    result["probe"] = be.probe.to_dict() if be.probe else None
    result["storage"] = storage_bandwidth(be)
    be.file.read_bytes, be.file.read_seconds = 0, 0.0
    result["paged"] = decode(paged, args.prompt_tokens, args.new_tokens, args.repeats)
    result["paged"]["layers_read"] = be.reader.layers_read if be.reader else 0
    # storage again right after the paged run: the bound uses the median of the passes before and after
    be.reader.close()  # its read-ahead would compete with the passes
    be.reader = None
    after = storage_bandwidth(be)
    passes = result["storage"]["runs_bytes_per_s"] + after["runs_bytes_per_s"]
    result["storage"] = {**result["storage"], "bytes_per_s": statistics.median(passes), "runs_bytes_per_s": passes}
    # the storage speed the reader got while the paged run decoded (same run, same load)
    result["storage_in_run_bytes_per_s"] = be.file.read_bytes / be.file.read_seconds if be.file.read_seconds else None
    build_s, builds_per_s = session_builds(be)
    result["paged_layer_session_s"], result["paged_layer_sessions_per_s"] = round(build_s, 4), round(builds_per_s, 2)
    be.close()
    del paged

    # the bundle-graph executor (weights bound as graph inputs: what the CUDA / TensorRT providers get)
    std = paged_model(budget)
    result["paged_standard_graph"] = decode(std, args.prompt_tokens, args.new_tokens, args.repeats)
    std.backend.close()
    # the naive baseline: the same layers computed from an mmap of the file, evicted after use as a
    # memory limit of the same budget would
    naive = paged_model(budget, io="mmap")
    result["naive_mmap"] = decode(naive, args.prompt_tokens, args.new_tokens, args.repeats)
    naive.backend.close()
    layers = len(be.plan.layer_bytes)
    res_tps = result["resident"]["decode_tokens_per_s"]
    # a paged layer computes like a resident one after its session is built
    exec_tps = 1.0 / (layers * (result["paged_layer_session_s"] + 1.0 / (layers * res_tps)))
    result["paged_layers_compute"] = {"decode_tokens_per_s": round(exec_tps, 3)}
    bw = result["storage"]["bytes_per_s"]
    per_token = be.plan.bytes_paged_per_token
    storage_bound = bw / per_token if per_token else float("inf")
    result["bound_tokens_per_s"] = round(min(storage_bound, res_tps), 3)
    result["storage_bound_tokens_per_s"] = round(storage_bound, 3)
    # the executor's model: max(reading the paged layers, computing resident + paged layers) per token
    threads = len(os.sched_getaffinity(0))
    result["estimate_tokens_per_s"] = round(be.plan.decode_tokens_per_s(
        bw, res_tps, res_tps, build_s=result["paged_layer_session_s"], cores=threads, threads=threads,
        builds_per_s=result["paged_layer_sessions_per_s"], release_early=be.release_early), 3)
    # the planner's paged estimate (edge_sdk.planner.paged_estimate, fused executor) for this budget:
    # the board's storage speed under --emulate, else the storage speed measured here
    from edge_sdk.boards import get_board
    from edge_sdk.modelspec import shape_from_config
    from edge_sdk.planner import QuantSpec, paged_estimate, weight_bytes as planned_weights

    shape = shape_from_config(resident_manifest["source"]["config"])
    q = QuantSpec(group_size=int(resident_manifest["quantization"]["group_size"]))
    board = get_board(args.emulate or "agx-orin-64gb")
    store = board.default_storage
    if not args.emulate:  # this machine's disk in place of the board's
        from dataclasses import replace

        board = replace(board, storage={**board.storage, store: replace(board.storage[store], read_mbps=bw / 1e6)})
    # the planner with no measurement (the storage bound of its plan), and with the build and compute
    # times measured here (the executor's own model and plan choice)
    est = paged_estimate(shape, planned_weights(shape, q), board, store, budget, executor="fused", q=q)
    result["planner_storage_only"] = est
    probe = BuildProbe(bw, result["paged_layer_session_s"], 1.0 / (layers * res_tps), cores=threads, threads=threads,
                       release_early=be.release_early)
    est = paged_estimate(shape, planned_weights(shape, q), board, store, budget, executor="fused", q=q, probe=probe)
    result["planner"] = est
    result["ratio_to_planner"] = round(result["paged"]["decode_tokens_per_s"] / est["decode_tokens_per_s"], 3)
    got = result["paged"]["decode_tokens_per_s"]
    result["ratio_to_bound"] = round(got / result["bound_tokens_per_s"], 3)
    in_run = result["storage_in_run_bytes_per_s"]
    result["in_run_bound_tokens_per_s"] = round(min(in_run / per_token, res_tps), 3) if in_run and per_token else None
    result["ratio_to_estimate"] = round(got / result["estimate_tokens_per_s"], 3)
    result["load_after"] = list(os.getloadavg())
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    p = result["plan"]
    print(f"bundle {bundle}: weights {weights / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB ({args.budget})")
    print(f"plan: {len(p['resident_layers'])} layers resident {p['resident_layers']}, {len(p['paged_layers'])} paged, "
          f"{per_token / 2**20:.1f} MiB paged per token, {p['slots']} slots, {p['sessions']} sessions, peak {p['peak_bytes'] / 2**20:.0f} MiB")
    if result["probe"]:
        pr = result["probe"]
        print(f"load-time probe: read {pr['read_bytes_per_s'] / 1e6:.0f} MB/s, build {1000 * pr['build_s']:.1f} ms, "
              f"layer compute {1000 * pr['layer_compute_s']:.2f} ms -> the plan's shape")
    print(f"storage: {bw / 1e6:.0f} MB/s ({result['storage']['io']}; median of {result['storage']['runs_bytes_per_s']}), "
          f"{(result['storage_in_run_bytes_per_s'] or 0) / 1e6:.0f} MB/s inside the paged run -> storage bound {storage_bound:.2f} tokens/s")
    print(f"paged layer session build     {1000 * result['paged_layer_session_s']:.1f} ms alone, "
          f"{result['paged_layer_sessions_per_s']:.1f}/s with every builder busy "
          f"-> paged layers compute at {result['paged_layers_compute']['decode_tokens_per_s']:.2f} tokens/s")
    for k in ("resident", "paged", "paged_standard_graph", "naive_mmap"):
        r = result[k]
        print(f"{k:30s} decode {r['decode_tokens_per_s']:7.2f} tokens/s  prefill {r['prefill_tokens_per_s']:7.1f}/s  "
              f"CPU {1000 * r['cpu_s_per_token']:.0f} ms/token  load {r['load_average'][0]:.2f}")
    print(f"bound min(storage, resident) {result['bound_tokens_per_s']:.2f} tokens/s -> {100 * result['ratio_to_bound']:.0f}% reached")
    if result["in_run_bound_tokens_per_s"]:
        print(f"same bound from the in-run speed {result['in_run_bound_tokens_per_s']:.2f} tokens/s "
              f"-> {100 * got / result['in_run_bound_tokens_per_s']:.0f}% reached")
    print(f"executor estimate            {result['estimate_tokens_per_s']:.2f} tokens/s -> measured/estimate {result['ratio_to_estimate']:.2f}")
    print(f"planner paged estimate       {result['planner']['decode_tokens_per_s']:.2f} tokens/s "
          f"({result['planner']['paged_layers']} layers paged) -> measured/planner {result['ratio_to_planner']:.2f}")
    so = result["planner_storage_only"]
    print(f"planner storage-only bound    {so['decode_tokens_per_s']:.2f} tokens/s ({so['paged_layers']} layers paged) "
          f"-> measured/that {got / so['decode_tokens_per_s']:.2f}")
    print(f"load {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
