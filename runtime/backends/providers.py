"""onnxruntime execution providers: which to use, in which order, with which options."""

from __future__ import annotations

import logging
from pathlib import Path

from edge_sdk.errors import ConfigError

from .engine_cache import EngineKey

log = logging.getLogger("edge_sdk.runtime")

TRT_EP, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
BY_NAME = {"tensorrt-ep": TRT_EP, "cuda": CUDA_EP, "cpu": CPU_EP}
AUTO_ORDER = (TRT_EP, CUDA_EP, CPU_EP)


def choose(requested: str, available: list[str]) -> list[str]:
    """Provider list for InferenceSession, best first; CPU always last as the fallback for unsupported nodes."""
    if requested == "auto":
        chosen = [p for p in AUTO_ORDER if p in available]
    else:
        want = BY_NAME.get(requested)
        if want is None:
            raise ConfigError(f"provider {requested!r} is not an onnxruntime provider", hint=f"one of auto, {', '.join(BY_NAME)}")
        if want not in available:
            raise ConfigError(f"provider {requested!r} ({want}) is not offered by this onnxruntime (offers: {', '.join(available)})",
                              hint="install onnxruntime-gpu (JetPack: NVIDIA's Jetson wheel) or use provider='cpu'")
        # TensorRT EP hands what TensorRT cannot run to CUDA EP, then CPU
        chosen = [p for p in AUTO_ORDER[AUTO_ORDER.index(want):] if p in available]
    if CPU_EP not in chosen:
        chosen.append(CPU_EP)
    return chosen


def graph_kind(providers: list[str]) -> str:
    """fp16 activations on the GPU, fp32 on the CPU."""
    return "fp16" if providers[0] in (TRT_EP, CUDA_EP) else "fp32"


def trt_ep_options(cache_root: Path, key: EngineKey, *, workspace_bytes: int | None = None,
                   profile: dict[str, tuple[str, str, str]] | None = None) -> dict:
    """TensorRT EP options: engine and timing caches under the device's engine cache for this key.

    profile: {input name: (min, opt, max)} shapes as "1x1" strings, joined into TensorRT EP's
    `trt_profile_*_shapes` syntax `name:dims,name:dims`.
    """
    d = key.directory(cache_root)
    d.mkdir(parents=True, exist_ok=True)
    opts = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(d),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(key.timing_cache(cache_root).parent),
        "trt_fp16_enable": "True",
    }
    if workspace_bytes:
        opts["trt_max_workspace_size"] = str(int(workspace_bytes))
    if profile:
        for i, which in enumerate(("min", "opt", "max")):
            opts[f"trt_profile_{which}_shapes"] = ",".join(f"{name}:{dims[i]}" for name, dims in profile.items())
    return opts


def with_options(providers: list[str], options: dict[str, dict]) -> list:
    """InferenceSession's `providers=` form: (name, options) where options exist."""
    return [(p, options[p]) if p in options else p for p in providers]


def describe(providers: list[str], session_providers: list[str] | None = None) -> str:
    active = session_providers or providers
    return " > ".join(active)
