"""The whole path in one command: convert the built-in tiny DeepSeek-architecture model, serve it on
an emulated Jetson AGX Orin, ask it a chat question with the official openai client, shut down.

    python examples/demo.py                 # prints each step, the reply, and the commands to try next
    python examples/demo.py --dir DIR       # work in DIR instead of the default place
    python examples/demo.py --remove        # delete the work directory at the end

The model, bundle and daemon log stay in $EDGE_SDK_CACHE/demo (default ~/.cache/edge-sdk/demo), so that
`edge-sdk run`, `bench` and `serve` have a bundle to act on afterwards.

The tiny model has random weights, so its reply is gibberish; everything around it (GPTQ int4
conversion, signed-format bundle, onnxruntime with KV cache, batching daemon, SSE) is the real thing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def convert(work: Path, arch: str, method: str) -> Path:
    import edge_sdk
    from edge_sdk.converters.tiny import build_model_dir

    step(f"building the tiny {arch} DeepSeek-architecture checkpoint")
    model_dir = build_model_dir(work / f"tiny-{arch}", arch)
    step(f"converting it ({method} int4 -> ONNX -> bundle)")
    t0 = time.perf_counter()
    edge_sdk.convert(model_dir, work / "bundle", method=method, overwrite=True)
    print(f"bundle written to {work / 'bundle'} in {time.perf_counter() - t0:.1f} s")
    return work / "bundle"


def serve(bundle: Path, board: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    step(f"starting `edge-sdk serve` on an emulated {board}")
    cmd = [sys.executable, "-m", "edge_sdk.cli.main", "serve", "--bundle", str(bundle), "--emulate", board, "--port", "0"]
    print("$ " + " ".join(["edge-sdk", *cmd[3:]]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    log = open(log_path, "w")
    for line in proc.stdout:
        log.write(line)
        log.flush()
        m = re.search(r"listening on (\S+)", line)
        if m:
            threading.Thread(target=lambda: [log.write(l) or log.flush() for l in proc.stdout], daemon=True).start()
            return proc, m.group(1)
    raise SystemExit(f"the daemon exited with status {proc.wait()}; its log is in {log_path}")


def ask(url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="demo", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    question = [{"role": "user", "content": "What is the capital of France?"}]
    step(f"chat request to {url}/v1/chat/completions (model {model})")
    r = client.chat.completions.create(model=model, messages=question, max_tokens=32, temperature=0)
    print(f"reply ({r.choices[0].finish_reason}, {r.usage.prompt_tokens} prompt + {r.usage.completion_tokens} generated tokens):")
    msg = r.choices[0].message
    reasoning = getattr(msg, "reasoning_content", None) or ""  # DeepSeek's field: the text inside <think>
    print(f"  reasoning_content: {reasoning[:80]!r}{' ...' if len(reasoning) > 80 else ''}")
    print(f"  content: {msg.content!r}")
    step("the same request, streamed")
    parts, thought = [], []
    for chunk in client.chat.completions.create(model=model, messages=question, max_tokens=32, temperature=0, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            thought.append(getattr(delta, "reasoning_content", None) or "")
            parts.append(delta.content or "")
    same = "".join(parts) == (msg.content or "") and "".join(thought) == reasoning
    print(f"  {sum(1 for p, t in zip(parts, thought) if p or t)} chunks, identical to the reply: {same}")


def default_dir() -> Path:
    """$EDGE_SDK_CACHE/demo, else $XDG_CACHE_HOME/edge-sdk/demo, else ~/.cache/edge-sdk/demo."""
    from edge_sdk.paths import cache_dir

    return cache_dir() / "demo"


def next_commands(bundle: Path, board: str) -> list[str]:
    return [f"edge-sdk run {bundle} --emulate {board} --prompt 'Hello' --max-tokens 16",
            f"edge-sdk bench {bundle} --emulate {board}",
            f"edge-sdk serve --bundle {bundle} --emulate {board}      # then: curl localhost:8080/v1/models"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", "--keep", dest="dir", metavar="DIR", type=Path,
                    help="work directory, kept afterwards (default: $EDGE_SDK_CACHE/demo or ~/.cache/edge-sdk/demo)")
    ap.add_argument("--remove", action="store_true", help="delete the work directory at the end")
    ap.add_argument("--arch", default="qwen2", choices=("qwen2", "llama"), help="R1-Distill-Qwen or -Llama architecture")
    ap.add_argument("--method", default="gptq", choices=("gptq", "rtn"))
    ap.add_argument("--board", default="agx-orin-64gb")
    args = ap.parse_args(argv)
    work = args.dir or default_dir()
    work.mkdir(parents=True, exist_ok=True)
    proc = None
    try:
        bundle = convert(work, args.arch, args.method)
        proc, url = serve(bundle, args.board, work / "daemon.log")
        ask(url)
        step("stopping the daemon (SIGTERM: drain, flush, exit)")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        print(f"daemon exited with status {code}")
        if not args.remove:
            step(f"the bundle stays in {bundle} (the model has random weights: its text is gibberish); try next")
            print("\n".join(next_commands(bundle, args.board)))
        return code
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if args.remove:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
