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
                   profiles: list[dict[str, tuple[tuple[int, ...], ...]]] | None = None) -> dict:
    """TensorRT EP options: engine and timing caches under the device's engine cache for this key.

    profiles: explicit optimization profiles ({input name: (min, opt, max) shapes} each, every dynamic
    input in each), written as `trt_profile_{min,opt,max}_shapes` = `name:1x2,name:1x3,...`; an input
    named again starts its next profile. Without them the EP rebuilds its engine whenever a shape
    leaves the range it has seen.
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
    for i, which in enumerate(("min", "opt", "max") if profiles else ()):
        opts[f"trt_profile_{which}_shapes"] = ",".join(
            f"{name}:{'x'.join(map(str, dims[i]))}" for prof in profiles for name, dims in prof.items())
    return opts


def parse_profile_shapes(text: str) -> dict[str, list[tuple[int, ...]]]:
    """`name:1x2,name:1x3,other:4` -> {name: [(1, 2), (1, 3)], other: [(4,)]} (one entry per profile)."""
    out: dict[str, list[tuple[int, ...]]] = {}
    for item in filter(None, text.split(",")):
        name, _, dims = item.rpartition(":")
        if not name or not dims:
            raise ConfigError(f"profile shape {item!r} is not name:dims", hint="e.g. input_ids:1x128")
        try:
            shape = tuple(int(x) for x in dims.split("x"))
        except ValueError:
            raise ConfigError(f"profile shape {item!r} has a dimension that is not an integer", hint="e.g. input_ids:1x128") from None
        out.setdefault(name, []).append(shape)
    return out


def with_options(providers: list[str], options: dict[str, dict]) -> list:
    """InferenceSession's `providers=` form: (name, options) where options exist."""
    return [(p, options[p]) if p in options else p for p in providers]
