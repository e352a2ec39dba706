"""Choose how the decoder linears become int4: GPTQ, round-to-nearest, or import of a GPTQ checkpoint."""

from __future__ import annotations

from .archs import linear_names
from .quant import QuantResult, check_group, rtn


def quantize_checkpoint(ck, shape, calib, opts) -> QuantResult:
    from .checkpoint import load_weights

    if ck.quantization_config is not None:
        from .gptq_import import import_gptq

        return import_gptq(ck, shape, opts)
    names = linear_names(shape.num_layers, ck.arch)
    in_features = {"o_proj": shape.num_heads * shape.head_dim, "down_proj": shape.intermediate_size}
    for n in names:
        check_group(in_features.get(n.rsplit(".", 1)[1], shape.hidden_size), opts.group_size, n)
    if opts.method == "gptq":
        from .gptq import gptq_quantize

        # before our own copy of the weights is loaded: GPTQModel holds the model meanwhile
        quantized, method_info = gptq_quantize(ck, calib, opts, names)
        weights = load_weights(ck)
    else:
        weights = load_weights(ck)
        from tqdm import tqdm

        quantized = {n: rtn(weights[f"{n}.weight"], opts.group_size) for n in tqdm(names, desc="round-to-nearest", disable=not opts.progress)}
        method_info = {"method": "rtn"}
    if opts.lm_head_dtype == "int4":
        check_group(weights[ck.arch.lm_head].shape[1], opts.group_size, "lm_head")
        quantized["lm_head"] = rtn(weights[ck.arch.lm_head], opts.group_size)
    section = {
        "method": "gptq", "bits": opts.bits, "group_size": opts.group_size, "symmetric": True,
        "act_order": opts.act_order, "damp_percent": opts.damp_percent, "seed": opts.seed,
        "calibration": {"sha256": calib.sha256, "nsamples": calib.nsamples, "seqlen": len(calib.ids[0])},
        "lm_head_method": "rtn" if "lm_head" in quantized else None,
        "imported": False,
    } | method_info
    return QuantResult(weights, quantized, section)
