"""Symmetric int4 weights with one fp16 scale per group along the input dimension.

Convention shared by GPTQ, round-to-nearest and imported checkpoints: w ≈ q * scale with
q in [-8, 7] (zero point 0, what TensorRT's weight-only INT4 path accepts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QMIN, QMAX = -8, 7


@dataclass
class QuantizedLinear:
    q: torch.Tensor  # int8 [out, in], values in [-8, 7]
    scales: torch.Tensor  # fp16 [out, in / group_size]
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """fp32 [out, in]: exactly what DequantizeLinear computes from the stored int4 + fp16 scales."""
        return self.q.float() * self.scales.float().repeat_interleave(self.group_size, dim=1)

    def check(self) -> None:
        out, inp = self.q.shape
        assert self.q.dtype == torch.int8 and int(self.q.min()) >= QMIN and int(self.q.max()) <= QMAX
        assert self.scales.shape == (out, inp // self.group_size) and self.scales.dtype == torch.float16


@dataclass
class QuantResult:
    weights: dict[str, torch.Tensor]  # float tensors of the source (for imports: the dequantized checkpoint)
    quantized: dict[str, QuantizedLinear]  # {HF module name: int4 weights}
    section: dict  # the manifest's quantization fields


def group_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """GPTQ's symmetric grid: scale = 2 * absmax / 15 per group, rounded to fp16. w: [out, in] -> [out, in/g]."""
    out, inp = w.shape
    absmax = w.float().reshape(out, inp // group_size, group_size).abs().amax(-1)
    scale = (2 * absmax / (QMAX - QMIN)).clamp(min=1e-8)
    return scale.half().clamp(min=torch.finfo(torch.float16).tiny)


def quantize_with_scales(w: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    s = scales.float().repeat_interleave(group_size, dim=1)
    return torch.clamp(torch.round(w.float() / s), QMIN, QMAX).to(torch.int8)


def rtn(w: torch.Tensor, group_size: int, chunk_elements: int = 2**24) -> QuantizedLinear:
    """Round-to-nearest: the baseline GPTQ has to beat. Rows are independent (groups run along a row),
    so it works `chunk_elements` at a time: the fp32 temporaries stay small, the integers are the same."""
    out, inp = w.shape
    check_group(inp, group_size)
    q, scales = torch.empty(out, inp, dtype=torch.int8), torch.empty(out, inp // group_size, dtype=torch.float16)
    step = max(1, chunk_elements // inp)
    for a in range(0, out, step):
        scales[a:a + step] = group_scales(w[a:a + step], group_size)
        q[a:a + step] = quantize_with_scales(w[a:a + step], scales[a:a + step], group_size)
    return QuantizedLinear(q, scales, group_size)


def check_group(in_features: int, group_size: int, name: str = "weight") -> None:
    from edge_sdk.errors import ConversionError

    if in_features % group_size:
        raise ConversionError(f"{name}: {in_features} input features are not a multiple of group_size {group_size}",
                              hint="choose a group size that divides every hidden and intermediate size (128 or 64: TensorRT runs no other)")


def pack_int4(q: torch.Tensor) -> bytes:
    """ONNX INT4 layout: row-major elements, two per byte, the first in the low nibble."""
    return b"".join(pack_int4_chunks(q))


def pack_int4_chunks(q: torch.Tensor, rows: int = 2048):
    """pack_int4's bytes in pieces of `rows` rows of q (any 2-D view, e.g. a transpose): the bytes are
    the same, and no full-size copy of q is made."""
    q = q.reshape(-1, q.shape[-1]) if q.dim() != 2 else q
    rows = rows + rows % 2  # an even row count: a byte never spans two pieces
    for a in range(0, q.shape[0], rows):
        flat = q[a:a + rows].reshape(-1).to(torch.int16) & 0xF
        if flat.numel() % 2:  # only the last piece can be odd
            flat = torch.cat([flat, flat.new_zeros(1)])
        pairs = flat.reshape(-1, 2)
        yield (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8).numpy().tobytes()
