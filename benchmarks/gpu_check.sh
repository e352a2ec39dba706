#!/usr/bin/env bash
# The GPU path on whatever GPU machine is lent, in one run under 8 minutes (each stage has its own limit).
#   benchmarks/gpu_check.sh [WORK_DIR]
# 1. what the machine has (nvidia-smi; onnxruntime-gpu / tensorrt / cuda-python wheels; onnxruntime providers);
# 2. CUDA EP logits and greedy tokens vs the CPU provider on a tiny bundle with an fp16 graph;
# 3. decode tokens/s on the DeepSeek-R1-Distill-Qwen-1.5B shape (random weights, rtn) against the GPU's
#    memory-bandwidth roofline (weight bytes read per token);
# 4. if TensorRT imports: a native engine build of the tiny bundle and the native backend's greedy tokens
#    vs the CPU provider (prompts 1 and 600 tokens: prefill, chunked prefill, decode).
# Needs no network beyond PyPI. The closing note says what ran and what could not.
set -uo pipefail
WORK="${1:-${TMPDIR:-/tmp}/edge-sdk-gpu-check}"
PY="${PYTHON:-python}"
mkdir -p "$WORK"
declare -a RAN SKIPPED
stage() {  # stage NAME SECONDS PYTHON-CODE
    local name=$1 limit=$2 code=$3
    echo "== $name (limit ${limit}s)"
    if timeout "$limit" "$PY" -c "$code" "$WORK"; then RAN+=("$name"); else SKIPPED+=("$name (exit $?)"); fi
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1 | head -5 || true
"$PY" -m pip list 2>/dev/null | grep -i -E "^(onnxruntime|onnxruntime-gpu|tensorrt|tensorrt[-_]cu|cuda-python|cuda-bindings|torch) " || true
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tail -1

stage "tiny bundle (fp32 + fp16 graphs)" 180 '
import sys
from pathlib import Path
from edge_sdk.converters import convert
from edge_sdk.converters.tiny import build_model_dir
w = Path(sys.argv[1])
if not (w / "tiny.bundle" / "manifest.json").exists():
    convert(build_model_dir(w / "tiny-model", "qwen2", seed=0), w / "tiny.bundle", graphs=("fp32", "fp16"),
            nsamples=8, seqlen=128, eval_tokens=256, progress=False, overwrite=True)
print("tiny bundle ready")'

stage "CUDA EP logits vs CPU" 120 '
import sys
import numpy as np
from pathlib import Path
from edge_sdk.runtime.loader import make_backend, open_bundle
from edge_sdk.runtime.options import RuntimeOptions
b = Path(sys.argv[1]) / "tiny.bundle"
m = open_bundle(b, RuntimeOptions())
gpu = make_backend(b, m, RuntimeOptions(provider="cuda"))
cpu = make_backend(b, m, RuntimeOptions(provider="cpu", graph="standard"))
ids = np.random.default_rng(0).integers(3, 1000, (1, 600)).astype(np.int64)
def run(be):
    c = be.new_cache(1, 620)
    logits = np.concatenate([be.forward(ids[:, s:s + 512], c) for s in (0, 512)], axis=1)
    toks = []
    t = logits[:, -1].argmax(-1)
    for _ in range(16):
        toks.append(int(t[0]))
        t = be.forward(t[:, None].astype(np.int64), c)[:, -1].argmax(-1)
    return logits, toks
(lg, tg), (lc, tc) = run(gpu), run(cpu)
print("providers", gpu.session.get_providers())
print(f"max |logit diff| fp16 CUDA vs fp32 CPU: {np.abs(lg - lc).max():.3e}; top-1 agreement {np.mean(lg.argmax(-1) == lc.argmax(-1)):.4f}")
print("greedy tokens equal" if tg == tc else f"greedy tokens differ: {tg} vs {tc}")'

stage "decode tok/s on the 1.5B shape vs roofline" 300 '
import json, subprocess, sys, time
import numpy as np
from pathlib import Path
from edge_sdk.converters import convert
from edge_sdk.converters.tiny import build_model_dir, tiny_config
from edge_sdk.runtime.loader import make_backend, open_bundle
from edge_sdk.runtime.options import RuntimeOptions
w = Path(sys.argv[1])
b = w / "qwen1.5b-shape.bundle"
if not (b / "manifest.json").exists():
    cfg = tiny_config("qwen2", 151936, hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                      num_hidden_layers=28, max_position_embeddings=4096)
    convert(build_model_dir(w / "qwen1.5b-shape", "qwen2", seed=0, config=cfg), b, method="rtn", graphs=("fp32", "fp16"),
            verify=False, eval_tokens=64, progress=False, overwrite=True, device="cuda")
m = open_bundle(b, RuntimeOptions())
weights = sum(t["nbytes"] for t in m.get("weights", {}).get("tensors", {}).values()) or sum(
    f.stat().st_size for f in b.iterdir() if f.suffix in (".data", ".bin", ".safetensors"))
embed = 151936 * 1536 * 2  # embedding rows are gathered, not read whole
name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
bw = next((v for k, v in {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 8.64e11, "A10": 6.0e11, "L4": 3.0e11,
                          "Orin": 2.048e11}.items() if k in name), None)
be = make_backend(b, m, RuntimeOptions(provider="cuda"))
c = be.new_cache(1, 160)
be.forward(np.arange(3, 131, dtype=np.int64)[None], c)
t = np.asarray([[5]], np.int64)
start = time.perf_counter()
for _ in range(24):
    t = be.forward(t, c)[:, -1].argmax(-1)[:, None].astype(np.int64)
tps = 24 / (time.perf_counter() - start)
line = f"decode {tps:.1f} tok/s on {name or chr(63)}; bytes read per token ~{(weights - embed) / 2**20:.0f} MiB"
if bw:
    roof = bw / max(weights - embed, 1)
    line += f"; roofline {roof:.0f} tok/s at {bw / 1e12:.2f} TB/s -> {100 * tps / roof:.1f}% of it"
print(line)'

stage "TensorRT engine build + native backend" 300 '
import sys
import numpy as np
from pathlib import Path
import tensorrt
from edge_sdk.runtime.backends.kv_cache import ModelIO
from edge_sdk.runtime.backends.tensorrt.backend import TensorRTBackend
from edge_sdk.runtime.backends.tensorrt.build import EngineBuildSettings, build_engine
from edge_sdk.runtime.loader import make_backend, open_bundle
from edge_sdk.runtime.options import RuntimeOptions
w = Path(sys.argv[1])
b = w / "tiny.bundle"
m = open_bundle(b, RuntimeOptions())
s = EngineBuildSettings(max_batch=2, max_prompt=512, max_seq_len=1024, opt_prompt=128, opt_past=256)
path, _ = build_engine(b, m, "local", tensorrt, settings=s, cache_root=w / "engines", force=True)
trt_be = TensorRTBackend(path, ModelIO.from_manifest(m), tensorrt)
cpu = make_backend(b, m, RuntimeOptions(provider="cpu", graph="standard"))
def greedy(be, n):
    ids = np.random.default_rng(n).integers(3, 1000, (1, n)).astype(np.int64)
    c = be.new_cache(1, n + 8)
    for s0 in range(0, n, 512):
        lg = be.forward(ids[:, s0:s0 + 512], c)[:, -1]
    out = []
    for _ in range(8):
        t = lg.argmax(-1)
        out.append(int(t[0]))
        lg = be.forward(t[:, None].astype(np.int64), c)[:, -1]
    return out
for n in (1, 600):
    a, c = greedy(trt_be, n), greedy(cpu, n)
    print(f"prompt {n}: TensorRT {a} CPU {c} {chr(61) * 2 if a == c else chr(33) + chr(61)}")'

echo "== closing note"
(IFS=';'; echo "ran:     ${RAN[*]:-(none)}"; echo "skipped: ${SKIPPED[*]:-(none)}")
