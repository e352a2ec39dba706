"""Import a checkpoint already quantized with GPTQ (qweight/qzeros/scales/g_idx) without re-quantizing.

Packing (GPTQ "gptq" v1 and "gptq_v2" formats, 4 bits, int32 words):
  qweight [in / 8, out]: input channel 8 * r + j of column o is bits 4j..4j+3 of qweight[r, o]
  qzeros  [groups, out / 8]: zero of column 8 * c + j is bits 4j..4j+3 of qzeros[g, c]
          (v1 stores zero - 1, v2 the zero itself)
  scales  [groups, out] fp16;  g_idx [in]: group of each input channel
  w[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]
The bundle needs zero = 8 (symmetric) and contiguous groups (g_idx[i] = i // group_size).
"""

from __future__ import annotations

import torch

from edge_sdk.errors import ConversionError

from .archs import linear_names
from .quant import QuantizedLinear

SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # 8 nibbles per int32 word


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 -> [R * 8, C] nibbles along dim 0."""
    nib = (packed.unsqueeze(1) >> SHIFTS.view(1, 8, 1)) & 0xF  # [R, 8, C]
    return nib.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 -> [R, C * 8] nibbles along dim 1."""
    nib = (packed.unsqueeze(-1) >> SHIFTS.view(1, 1, 8)) & 0xF  # [R, C, 8]
    return nib.reshape(packed.shape[0], -1)


def settings(qc: dict, source: str) -> dict:
    """Validate a checkpoint's quantization_config; return bits, group_size, v2, desc_act."""
    method = str(qc.get("quant_method") or qc.get("method") or "gptq").lower()
    if method != "gptq":
        raise ConversionError(f"{source}: quantization method {method!r} cannot be imported", hint="import GPTQ checkpoints, or convert the float model")
    bits = int(qc.get("bits", 4))
    if bits != 4:
        raise ConversionError(f"{source}: {bits}-bit GPTQ checkpoint; the bundle stores int4", hint="convert the float model instead")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ConversionError(f"{source}: GPTQ checkpoint format {fmt!r} is not supported", hint="supported: gptq (v1), gptq_v2")
    return {"bits": bits, "group_size": int(qc.get("group_size", 128)), "v2": fmt == "gptq_v2",
            "desc_act": bool(qc.get("desc_act", False)), "sym": bool(qc.get("sym", True)), "format": fmt}


def import_linear(sd: dict, name: str, st: dict) -> QuantizedLinear:
    qweight, qzeros, scales = sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"]
    q = unpack_rows(qweight)  # [in, out] in 0..15
    zeros = unpack_cols(qzeros)[:, : scales.shape[1]] + (0 if st["v2"] else 1)  # [groups, out]
    in_features, g = q.shape[0], st["group_size"] if st["group_size"] > 0 else q.shape[0]
    g_idx = sd.get(f"{name}.g_idx")
    contiguous = torch.arange(in_features, dtype=torch.int32) // g
    if g_idx is not None and not torch.equal(g_idx.to(torch.int32), contiguous):
        raise ConversionError(
            f"{name}: the checkpoint was quantized with desc_act (act-order) permuted groups",
            hint="int4 DequantizeLinear needs contiguous groups; re-quantize the float model with `edge-sdk convert` "
                 "(it uses act_group_aware ordering, which keeps groups contiguous)")
    if not torch.all(zeros == 8):
        raise ConversionError(
            f"{name}: asymmetric GPTQ weights (zero points other than 8)",
            hint="TensorRT's int4 weight-only path accepts zero-point 0 only; re-quantize the float model with `edge-sdk convert` (symmetric)")
    signed = (q.to(torch.int16) - 8).to(torch.int8).t().contiguous()  # [out, in]
    return QuantizedLinear(signed, scales.to(torch.float16).t().contiguous(), g)


def import_gptq(ck, shape, opts):
    from .checkpoint import load_weights
    from .quant import QuantResult, rtn

    st = settings(ck.quantization_config, str(ck.path))
    sd = load_weights(ck)
    names = linear_names(shape.num_layers, ck.arch)
    missing = [n for n in names if f"{n}.qweight" not in sd]
    if missing:
        raise ConversionError(f"{ck.path}: quantization_config says GPTQ but {missing[0]}.qweight is missing",
                              hint="is the checkpoint complete?")
    quantized = {n: import_linear(sd, n, st) for n in names}
    weights = {k: v for k, v in sd.items() if not k.endswith((".qweight", ".qzeros", ".g_idx", ".scales"))}
    for n, ql in quantized.items():
        weights[f"{n}.weight"] = ql.dequantize()
    if f"{ck.arch.lm_head[:-7]}.qweight" in sd:
        quantized["lm_head"] = import_linear(sd, "lm_head", st)
        weights[ck.arch.lm_head] = quantized["lm_head"].dequantize()
    elif opts.lm_head_dtype == "int4":
        quantized["lm_head"] = rtn(weights[ck.arch.lm_head], st["group_size"])
    section = {
        "method": "gptq", "bits": 4, "group_size": st["group_size"], "symmetric": True,
        "act_order": "act_group_aware" if not st["desc_act"] else "desc_act (contiguous groups)",
        "damp_percent": (ck.quantization_config.get("meta") or {}).get("damp_percent", ck.quantization_config.get("damp_percent")),
        "seed": None, "calibration": None, "imported": True, "imported_format": st["format"],
        "lm_head_method": ("imported" if f"{ck.arch.lm_head[:-7]}.qweight" in sd else "rtn") if "lm_head" in quantized else None,
    }
    return QuantResult(weights, quantized, section)
