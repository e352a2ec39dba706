"""lm-evaluation-harness against `edge-sdk serve` and against the float PyTorch model, same tasks.

    python benchmarks/bench_lm_eval.py [--model DIR] [--workdir DIR] [--limit 100] [--json]

Needs `pip install "lm-eval[api]"` (0.4.x) and edge-sdk[convert]. Everything is local: the model is the
trained tiny Qwen2 (scripts/train_tiny.py), the tasks are two YAML files written next to a JSON-lines
dataset cut from its held-out text (tests/data/corpus, Python source), so no hub is reached:

- code_next_line_mc (log-likelihood, `acc`): the 6 lines before a line, then which of 4 comes next:
  the true line, another line of the text, its words shuffled, or it written backwards;
- code_next_line_gen (generation, `exact_match`): the same context and the line up to its middle,
  greedy until a space or newline: the rest of the word cut there must come out exactly.

The bundle (GPTQ int4, converted once into --workdir) is served by `edge-sdk serve` and evaluated with
lm-eval's `local-completions` model (token-id prompts, echo + logprobs for log-likelihood); the float
model with lm-eval's `hf` model on the CPU. The difference is int4 plus the runtime: a sanity check
that the numbers travel through the API, not a quality claim; per document, the log-likelihoods of
each choice and the generated texts are compared too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
CONTEXT_LINES = 6
TASKS = ("code_next_line_mc", "code_next_line_gen")


def build_dataset(text: str, n: int, seed: int = 0) -> list[dict]:
    """Docs whose next line is a non-trivial line of code, seen once."""
    lines = text.split("\n")
    pool = [ln for ln in lines if len(ln.strip()) >= 12]
    rng = random.Random(seed)
    docs, seen = [], set()
    candidates = [i for i in range(CONTEXT_LINES, len(lines)) if len(lines[i].strip()) >= 12]
    rng.shuffle(candidates)
    for i in candidates:
        target = lines[i]
        if target in seen:
            continue
        seen.add(target)
        context = "\n".join(lines[i - CONTEXT_LINES:i]) + "\n"
        choices = [target, *_distractors(target, pool, rng)]
        if len(set(choices)) < 4:
            continue
        rng.shuffle(choices)
        indent = len(target) - len(target.lstrip())
        cut = indent + (len(target) - indent) // 2  # generation: the rest of the word the line's middle falls in
        word = target[cut:].split(" ")[0]
        if not word:
            continue
        docs.append({"context": context, "choices": choices, "label": choices.index(target),
                     "gen_context": context + target[:cut], "gen_target": word})
        if len(docs) == n:
            break
    return docs


def _distractors(target: str, pool: list[str], rng: random.Random) -> list[str]:
    """Another line of the text, the line's words shuffled, the line written backwards."""
    indent = target[:len(target) - len(target.lstrip())]
    words = target.split()
    rng.shuffle(words)
    return [rng.choice(pool), indent + " ".join(words), indent + target.strip()[::-1]]


def write_tasks(workdir: Path, docs: list[dict]) -> Path:
    tasks = workdir / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = tasks / "code_next_line.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: context\ntarget_delimiter: \"\"\n")
    (tasks / "code_next_line_mc.yaml").write_text(
        "task: code_next_line_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "code_next_line_gen.yaml").write_text(
        "task: code_next_line_gen\n" + common.replace("doc_to_text: context", "doc_to_text: gen_context")
        + "output_type: generate_until\ndoc_to_target: gen_target\n"
        "generation_kwargs:\n  until: [\" \", \"\\n\"]\n  max_gen_toks: 16\n  do_sample: false\n  temperature: 0.0\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks


def convert_once(model_dir: Path, out: Path) -> Path:
    if not (out / "manifest.json").exists():
        from edge_sdk.converters import convert

        convert(model_dir, out, method="gptq", calib=str(model_dir / "calib.txt"), nsamples=32, seqlen=256,
                lm_head_dtype="fp16", eval_text=str(model_dir / "eval.txt"), eval_tokens=2048)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(bundle: Path, port: int, log: Path, emulate: str) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("edge-sdk")
    board = ["--emulate", emulate] if emulate != "none" else []
    proc = subprocess.Popen([str(exe), "serve", "--bundle", str(bundle), "--port", str(port), "--max-batch", "1", *board],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"edge-sdk serve exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"edge-sdk serve did not become healthy in 120 s; see {log}")


def evaluate(model: str, model_args: dict, tasks_dir: Path, limit: int) -> tuple[dict, dict]:
    """(accuracy per task, per-document responses: log-likelihood per choice, generated text)"""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), limit=limit, batch_size=1,
                          task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True)
    res = out["results"]
    scores = {"code_next_line_mc": res["code_next_line_mc"]["acc,none"],
              "code_next_line_gen": res["code_next_line_gen"]["exact_match,none"]}
    per_doc = {"code_next_line_mc": {d["doc_id"]: [float(r[0]) for r in d["filtered_resps"]] for d in out["samples"]["code_next_line_mc"]},
               "code_next_line_gen": {d["doc_id"]: d["filtered_resps"][0] for d in out["samples"]["code_next_line_gen"]}}
    return scores, per_doc


def agreement(api: dict, ref: dict) -> dict:
    """How closely the two runs agree document by document (the numbers travelled intact if this is tight)."""
    lls = [(a, ref["code_next_line_mc"][k]) for k, a in api["code_next_line_mc"].items()]
    diffs = [abs(x - y) for a, r in lls for x, y in zip(a, r)]
    gens = [(g, ref["code_next_line_gen"][k]) for k, g in api["code_next_line_gen"].items()]
    return {"mc_mean_abs_loglikelihood_diff": round(sum(diffs) / len(diffs), 4),
            "mc_max_abs_loglikelihood_diff": round(max(diffs), 4),
            "mc_same_choice": round(sum(max(range(len(a)), key=a.__getitem__) == max(range(len(r)), key=r.__getitem__)
                                        for a, r in lls) / len(lls), 4),
            "gen_identical_text": round(sum(a == r for a, r in gens) / len(gens), 4)}


def main() -> int:
    from train_tiny import DEFAULT_OUT, corpus_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT, help="trained tiny model directory")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edge-sdk-lm-eval"))
    ap.add_argument("--limit", type=int, default=100, help="documents per task")
    ap.add_argument("--emulate", default="agx-orin-64gb", help="board the daemon plans memory for ('none': this host)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (args.model / "model.safetensors").exists():
        raise SystemExit(f"no trained model in {args.model}: run `python scripts/train_tiny.py` first")
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OPENAI_API_KEY="none")
    args.workdir.mkdir(parents=True, exist_ok=True)
    tasks = write_tasks(args.workdir, build_dataset(corpus_text("eval"), args.limit))
    bundle = convert_once(args.model, args.workdir / "bundle")
    port = free_port()
    proc = serve(bundle, port, args.workdir / "serve.log", args.emulate)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            served = json.loads(r.read())["data"][0]["id"]
        t = time.perf_counter()
        api, api_docs = evaluate("local-completions", {"base_url": f"http://127.0.0.1:{port}/v1/completions", "model": served,
                                             "tokenizer_backend": "huggingface", "tokenizer": str(bundle),
                                             "num_concurrent": 1, "max_retries": 1, "tokenized_requests": True,
                                             "add_bos_token": True},
                       tasks, args.limit)
        api_s = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    t = time.perf_counter()
    # the same tokenizer on both sides: transformers loads the model directory's tokenizer.json as a
    # Qwen2Tokenizer (its config says qwen2), whose own pre-tokenizer splits text differently from the
    # file the model was trained with; the bundle directory (no config.json) loads the file as written
    ref, ref_docs = evaluate("hf", {"pretrained": str(args.model), "tokenizer": str(bundle), "dtype": "float32",
                                    "device": "cpu", "add_bos_token": True}, tasks, args.limit)
    ref_s = time.perf_counter() - t
    result = {"documents_per_task": args.limit,
              "edge-sdk serve (int4 bundle)": api, "float PyTorch": ref,
              "difference": {k: round(api[k] - ref[k], 4) for k in api},
              "per_document": agreement(api_docs, ref_docs),
              "seconds": {"api": round(api_s, 1), "float": round(ref_s, 1)}}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{'task':22s} {'edge-sdk serve':>15s} {'float PyTorch':>14s} {'difference':>11s}")
    for k in api:
        print(f"{k:22s} {api[k]:15.4f} {ref[k]:14.4f} {api[k] - ref[k]:+11.4f}")
    print("per document: " + ", ".join(f"{k} {v}" for k, v in result["per_document"].items()))
    print(f"({args.limit} documents per task; {api_s:.0f} s through the API, {ref_s:.0f} s on PyTorch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
