#!/usr/bin/env bash
# GPTQ conversion of a DeepSeek-R1-Distill-Qwen-7B-shaped checkpoint (random weights) on one GPU.
# Goal: under 8 minutes. Prints wall time, per-layer time and peak GPU memory.
#   benchmarks/gpu_convert_check.sh [cuda:0] [WORK_DIR]
set -euo pipefail
DEVICE="${1:-cuda:0}"
WORK="${2:-${EDGE_SDK_CACHE:-$HOME/.cache/edge-sdk}/bench}"
PY="${PYTHON:-python}"
"$PY" - "$DEVICE" <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device here (torch {torch.__version__}): this check needs a GPU")
print(f"device {sys.argv[1]}: {torch.cuda.get_device_name(torch.device(sys.argv[1]))}")
PYEOF
SRC=$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; import bench_convert as b; print(b.build('deepseek-r1-distill-qwen-7b', Path('$WORK'), None))")
START=$(date +%s)
"$PY" -m edge_sdk.cli.main convert "$SRC" -o "$WORK/gpu-check.bundle" --overwrite --json --device "$DEVICE" \
    --nsamples 32 --seqlen 512 --eval-tokens 512 > "$WORK/gpu-check.json"
END=$(date +%s)
"$PY" - "$WORK/gpu-check.json" $((END - START)) <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
wall = int(sys.argv[2])
ls = list(s["layer_seconds"].values())
print(f"wall {wall / 60:.1f} min (goal < 8 min) {'PASS' if wall < 480 else 'FAIL'}")
print(f"stages {s['seconds']}")
print(f"per layer {sum(ls) / len(ls):.2f}s over {len(ls)} layers on {s['device']}")
print(f"peak GPU memory {s['gpu_peak_bytes'] / 2**30:.2f} GiB, peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB")
PYEOF
