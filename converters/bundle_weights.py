"""Read a bundle's weights file back as float tensors in Hugging Face naming (numpy only).

The inverse of the export: int4 `qweight` [in, out] and fp16 `scales` [in / g, out] become
`<linear>.weight` [out, in] = q * scale; fp16 tensors become float32. Used to check a bundle against
an independent PyTorch/transformers model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def unpack_int4(data: bytes, shape: list[int]) -> np.ndarray:
    """ONNX INT4 bytes (first element in the low nibble) -> int8 array of `shape`."""
    b = np.frombuffer(data, dtype=np.uint8)
    nib = np.stack([b & 0xF, b >> 4], axis=-1).reshape(-1)[: int(np.prod(shape))].astype(np.int8)
    return np.where(nib > 7, nib - 16, nib).astype(np.int8).reshape(shape)


def read_tensor(weights: bytes | memoryview, meta: dict) -> np.ndarray:
    raw = weights[meta["offset"]: meta["offset"] + meta["nbytes"]]
    if meta["dtype"] == "int4":
        return unpack_int4(bytes(raw), meta["shape"])
    return np.frombuffer(raw, dtype=np.dtype(meta["dtype"])).reshape(meta["shape"])


def dequantized_state_dict(bundle: str | Path, manifest: dict) -> dict[str, np.ndarray]:
    """{HF weight name: float32 array} of everything the bundle stores."""
    ws = manifest["weights"]
    data = (Path(bundle) / ws["file"]).read_bytes()
    g = manifest["quantization"]["group_size"]
    out: dict[str, np.ndarray] = {}
    for name, meta in ws["tensors"].items():
        if name.endswith(".scales"):
            continue
        if name.endswith(".qweight"):
            module = name[: -len(".qweight")]
            q = read_tensor(data, meta).astype(np.float32)  # [in, out]
            s = read_tensor(data, ws["tensors"][f"{module}.scales"]).astype(np.float32)  # [in / g, out]
            out[f"{module}.weight"] = np.ascontiguousarray((q * np.repeat(s, g, axis=0)).T)
        else:
            t = read_tensor(data, meta).astype(np.float32)
            out[name] = np.ascontiguousarray(t.T) if name == "lm_head.weight" else t  # fp16 lm_head is stored [in, out]
    return out
