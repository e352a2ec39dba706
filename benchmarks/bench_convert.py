#!/usr/bin/env python
"""Conversion time and peak memory for a random-weight model with a real DeepSeek shape.

    python benchmarks/bench_convert.py [--config deepseek-r1-distill-qwen-1.5b] [--nsamples 32] [--seqlen 512]
    python benchmarks/bench_convert.py --config deepseek-r1-distill-qwen-7b --method rtn --compare

Builds the checkpoint (bf16 safetensors, random weights, the SDK's small tokenizer: calibration ids
stay below its vocabulary, which changes nothing in the cost) in --work, then runs
`edge-sdk convert --json` in a child process and reports its wall time per stage, its peak RSS,
and the bundle's weight bytes against `edge-sdk plan`. Random weights measure cost, not accuracy.
--compare runs `--dry-run` first and prints its per-stage prediction beside the measured stages.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from edge_sdk.paths import cache_dir


def build(cfg_name: str, work: Path, layers: int | None, shard_bytes: int = 2 * 2**30) -> Path:
    """A sharded bf16 checkpoint with model.safetensors.index.json, written one tensor at a time."""
    from edge_sdk.converters.archs import arch_for
    from edge_sdk.modelspec import shape_from_config
    from edge_sdk.converters.tensors import expected_shapes

    d = work / (f"{cfg_name}-random" + (f"-{layers}l" if layers else ""))
    if (d / "model.safetensors.index.json").is_file():
        return d
    cfg = json.loads(resources.files("edge_sdk.data").joinpath("configs", f"{cfg_name}.json").read_text())
    if layers:
        cfg["num_hidden_layers"] = layers
        cfg["max_window_layers"] = min(cfg.get("max_window_layers", layers), layers)
    cfg.pop("torch_dtype", None)
    cfg["bos_token_id"], cfg["eos_token_id"] = 0, 1
    arch = arch_for(cfg)
    shape = shape_from_config(cfg)
    names = expected_shapes(shape, arch, None)
    ordered = {arch.embed: names[arch.embed]}
    for i in range(shape.num_layers):
        ordered |= expected_shapes(shape, arch, i)
    ordered[arch.final_norm] = names[arch.final_norm]
    if not shape.tie_word_embeddings:
        ordered[arch.lm_head] = names[arch.lm_head]
    t = time.time()
    write_random_checkpoint(d, cfg, ordered, shard_bytes)
    print(f"built {d} in {time.time() - t:.0f}s", file=sys.stderr)
    return d


def write_random_checkpoint(d: Path, cfg: dict, ordered: dict, shard_bytes: int = 2 * 2**30) -> Path:
    """A sharded bf16 checkpoint of random weights (norms near 1) with model.safetensors.index.json,
    written one tensor at a time in `ordered`'s order, plus config.json and a small real tokenizer."""
    import torch
    from safetensors.torch import save_file

    from edge_sdk.converters.tiny import build_tokenizer, default_calibration_text, write_tokenizer

    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, k = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, k
        if shard:
            k += 1
            save_file(shard, str(d / f"model-{k:05d}.safetensors"), metadata={"format": "pt"})
            for n in shard:
                weight_map[n] = f"model-{k:05d}.safetensors"
            shard, size = {}, 0

    for name, shp in ordered.items():
        x = torch.empty(shp, dtype=torch.bfloat16)
        if "norm" in name:
            x.copy_(1 + 0.1 * torch.randn(shp, generator=g))
        else:
            for a in range(0, shp[0], 4096):  # fp32 noise in row chunks
                x[a:a + 4096] = 0.02 * torch.randn((min(4096, shp[0] - a), *shp[1:]), generator=g)
        shard[name] = x
        size += x.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(build_tokenizer([default_calibration_text()]), d)
    return d


def evict(checkpoint: Path) -> None:
    """Drop the checkpoint's shards from the page cache (the prediction assumes a cold checkpoint)."""
    for f in checkpoint.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_sampled(cmd: list[str]) -> tuple[subprocess.CompletedProcess, list[tuple[float, float, float]]]:
    """Run `cmd`; every second sample (time, the child's CPU seconds, 1-minute load average)."""
    import threading

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    samples, tick = [], os.sysconf("SC_CLK_TCK")

    def sample():
        while p.poll() is None:
            try:
                f = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                samples.append((time.time(), (int(f[11]) + int(f[12])) / tick, os.getloadavg()[0]))
            except (OSError, IndexError, ValueError):
                pass
            time.sleep(1.0)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = p.communicate()[0]
    th.join()
    return subprocess.CompletedProcess(cmd, p.returncode, out), samples


def per_stage(stages: dict[str, float], samples, end: float) -> dict[str, dict]:
    """The child's CPU seconds and the mean load average in each stage; stages are laid back to back
    ending at `end` (the child's exit; what follows the last stage is a few seconds of cleanup)."""
    out, t = {}, end
    for name, sec in reversed(stages.items()):
        inside = [x for x in samples if t - sec <= x[0] <= t]
        cpu = inside[-1][1] - inside[0][1] if len(inside) > 1 else None
        out[name] = {"cpu_s": round(cpu, 1) if cpu is not None else None,
                     "load": round(sum(x[2] for x in inside) / len(inside), 2) if inside else None}
        t -= sec
    return dict(reversed(out.items()))


def compare(args, src: Path, out: Path, cmd: list[str]) -> int:
    """--dry-run, then the real conversion from a fresh work directory and a cold checkpoint; per stage
    predicted vs measured seconds, with the load average and the converter's CPU seconds beside them."""
    import shutil

    evict(src)
    load0 = os.getloadavg()[0]
    r = subprocess.run(cmd + ["--dry-run"], stdout=subprocess.PIPE, text=True)
    if r.returncode:
        print(f"dry run failed with exit code {r.returncode}", file=sys.stderr)
        return r.returncode
    dry = json.loads(r.stdout)
    shutil.rmtree(dry["work_dir"])  # the real run quantizes every layer itself
    evict(src)
    load1 = os.getloadavg()[0]
    r, samples = run_sampled(cmd)
    end = time.time()
    if r.returncode:
        print(f"convert failed with exit code {r.returncode}", file=sys.stderr)
        return r.returncode
    real = json.loads(r.stdout)
    pred = dry["predicted"]["seconds_by_stage"]
    ctx = per_stage(real["seconds"], samples, end)
    rows = {k: {"predicted_s": pred.get(k), "measured_s": v} | ctx[k] for k, v in real["seconds"].items()}
    total_p, total_m = dry["predicted"]["seconds"], sum(real["seconds"].values())
    print(json.dumps({"config": args.config, "layers": args.layers, "method": args.method, "cpus": os.cpu_count(),
                      "dry_run": {"loadavg_before": round(load0, 2), "loadavg_after": round(load1, 2),
                                  "cpu_per_wall": dry.get("cpu_per_wall"), "stage_seconds": dry["seconds"], "predicted": dry["predicted"]},
                      "stages": rows, "predicted_s": total_p, "measured_s": round(total_m, 1),
                      "error_percent": round(100 * (total_p - total_m) / total_m, 1),
                      "layer_seconds": real.get("layer_seconds"), "peak_rss_gib": round(real["peak_rss_bytes"] / 2**30, 2)}, indent=2))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="deepseek-r1-distill-qwen-1.5b")
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench")
    ap.add_argument("--layers", type=int, help="fewer decoder layers (a partial measurement)")
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="only the prediction of `edge-sdk convert --dry-run`")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compare", action="store_true",
                    help="the dry run's prediction, then the conversion: predicted vs measured seconds per stage")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    src = build(args.config, args.work, args.layers)
    out = args.work / f"{src.name}-{args.method}.bundle"
    cmd = [sys.executable, "-m", "edge_sdk.cli.main", "convert", str(src), "-o", str(out), "--overwrite", "--json",
           "--method", args.method, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--eval-tokens", str(args.eval_tokens), "--device", args.device] + (["--no-verify"] if args.no_verify else [])
    if args.compare:
        return compare(args, src, out, cmd)
    load = os.getloadavg()
    t = time.time()
    r = subprocess.run(cmd + (["--dry-run"] if args.dry_run else []), stdout=subprocess.PIPE, text=True)
    wall = time.time() - t
    if r.returncode:
        print(f"convert failed with exit code {r.returncode}", file=sys.stderr)
        return r.returncode
    s = json.loads(r.stdout)
    if args.dry_run:
        print(json.dumps({"config": args.config, "layers": args.layers, "method": args.method, "predicted": s["predicted"],
                          "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}, indent=2))
        return 0
    from edge_sdk.planner import plan

    planned = plan(out, "agx-orin-64gb").weight_bytes["total"]
    result = {
        "config": args.config, "layers": args.layers, "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "wall_s": round(wall, 1), "stages_s": s["seconds"],
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "bundle_weight_bytes": s["weight_bytes"], "planned_weight_bytes": planned,
        "plan_diff_percent": round(100 * (s["weight_bytes"] - planned) / planned, 3),
        "files": s["files"], "loadavg_before": [round(x, 2) for x in load], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(), "layer_seconds": s.get("layer_seconds"), "device": s.get("device"),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
