"""Native TensorRT: building engines from the bundle graph and running them."""

from __future__ import annotations

from edge_sdk.errors import NotBuiltError


def require_tensorrt():
    """The tensorrt module, or one line saying where to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise NotBuiltError("TensorRT is not installed on this machine",
                            hint="on Jetson it comes with JetPack (`apt install nvidia-tensorrt`, python3-libnvinfer); "
                                 "elsewhere use provider='cpu' or 'cuda'") from exc
    return tensorrt


def tensorrt_version() -> str:
    """TensorRT's version, or "ep" where only the TensorRT EP's own library exists (its engines are still
    keyed by board and bundle)."""
    try:
        import tensorrt
    except ImportError:
        return "ep"
    return tensorrt.__version__


def load_cudart():
    """cuda-python's runtime API: `cuda.bindings.runtime` (cuda-python >= 12.6), else the older `cuda.cudart`."""
    import importlib

    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise NotBuiltError("cuda-python is not installed (the native TensorRT backend copies through it)",
                        hint="pip install 'edge-sdk[jetson]' (or: pip install cuda-python)")
