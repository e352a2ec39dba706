"""Decoder graph with KV cache → ONNX (IR 10, opset 21) with int4 weights as blocked DequantizeLinear.

Route: trace the float decoder (weights already q * scale) with torch.onnx, then replace each
quantized linear's float initializer by int4 `qweight` [in, out] + fp16 `scales` [in / g, out] feeding
`DequantizeLinear(axis=0, block_size=g)` -> MatMul. The rewrite is exact: DequantizeLinear
reproduces q * scale bit for bit. Other weights (embeddings, norms, biases) are stored fp16 and cast
where the graph computes in fp32.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from .archs import ATTN
from .quant import QuantizedLinear, pack_int4
from .weights_file import StoredTensor

IR_VERSION = 10
OPSET = 21
EXPORT_OPSET = 18  # what the TorchScript exporter emits; ops used have the same semantics at 21


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    kinds = ("key", "value")
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{k}" for i in range(num_layers) for k in kinds]
    outputs = ["logits"] + [f"present.{i}.{k}" for i in range(num_layers) for k in kinds]
    return inputs, outputs


def trace(decoder, num_layers: int):
    """torch.onnx (TorchScript exporter) -> onnx.ModelProto with float initializers, opset 18."""
    import onnx

    inputs, outputs = io_names(num_layers)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
           "attention_mask": {0: "batch", 1: "total_seq"}, "logits": {0: "batch", 1: "seq"}}
    dyn |= {n: {0: "batch", 2: "past_seq"} for n in inputs[3:]}
    dyn |= {n: {0: "batch", 2: "total_seq"} for n in outputs[1:]}
    ids = torch.zeros(1, 3, dtype=torch.long)
    past = decoder.empty_past(1)
    past = [torch.zeros(1, p.shape[1], 2, p.shape[3], dtype=p.dtype) for p in past]
    mask = torch.ones(1, 5, dtype=torch.long)
    pos = torch.arange(2, 5).unsqueeze(0)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(decoder, (ids, mask, pos, *past), buf, input_names=inputs, output_names=outputs,
                          dynamic_axes=dyn, opset_version=EXPORT_OPSET, dynamo=False, external_data=False,
                          do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def export_name_to_weight(name: str) -> str:
    """Traced parameter name -> the bundle's weight name (HF checkpoint naming)."""
    return name.replace(".attn.", ".self_attn.")


def rewrite(model, quantized: dict[str, QuantizedLinear], fp16_tensors: set[str], activation: str,
            weights: dict, weights_file: str, vocab_size: int):
    """Point `model` at the shared weights file: int4 DQ for quantized linears, fp16 (+Cast) for others.

    quantized: {HF linear name (model.layers.0.self_attn.q_proj, lm_head): QuantizedLinear}.
    weights: the `weights` manifest section (offsets of every stored tensor).
    """
    from onnx import TensorProto, helper

    g = model.graph
    f32 = activation == "float32"
    act_type = TensorProto.FLOAT if f32 else TensorProto.FLOAT16
    new_nodes_before: dict[str, list] = {}
    renames: dict[str, str] = {}
    keep = []
    experts: dict[str, tuple[str, str, int]] = {}
    for init in g.initializer:
        wname = export_name_to_weight(init.name)
        module = wname.rsplit(".", 1)[0]
        if init.name.endswith(".weight") and module in quantized:
            ql = quantized[module]
            node_path = "/" + init.name.rsplit(".", 1)[0].replace(".", "/").replace("layers/", "layers.")
            qname, sname = f"{module}.qweight", f"{module}.scales"
            scale_in = sname
            nodes = []
            if f32:
                scale_in = f"{sname}_fp32"
                nodes.append(helper.make_node("Cast", [sname], [scale_in], name=f"{node_path}/scales/Cast", to=TensorProto.FLOAT))
            if getattr(ql, "stacked", False):  # one MoE layer's experts, fed to QMoE as stored (uint4 bytes, scales)
                experts[init.name] = (qname, scale_in, ql.group_size)
                new_nodes_before[init.name] = nodes
                keep += [_external(qname, TensorProto.UINT8, weights, weights_file), _external(sname, TensorProto.FLOAT16, weights, weights_file)]
                continue
            out = f"{node_path}/DequantizeLinear/output_0"
            nodes.append(helper.make_node("DequantizeLinear", [qname, scale_in], [out], name=f"{node_path}/DequantizeLinear",
                                          axis=0, block_size=ql.group_size))
            new_nodes_before[init.name] = nodes
            renames[init.name] = out
            keep += [_external(qname, TensorProto.INT4, weights, weights_file), _external(sname, TensorProto.FLOAT16, weights, weights_file)]
        elif wname in fp16_tensors:
            keep.append(_external(wname, TensorProto.FLOAT16, weights, weights_file))
            if f32:
                out = f"{wname}_fp32"
                new_nodes_before[init.name] = [helper.make_node("Cast", [wname], [out], name=f"/{wname.replace('.', '/')}/Cast", to=TensorProto.FLOAT)]
                renames[init.name] = out
            else:
                renames[init.name] = wname
        elif weights["tensors"].get(wname, {}).get("dtype") == "float32":  # stored exact (V3's router correction bias)
            keep.append(_external(wname, TensorProto.FLOAT, weights, weights_file))
            renames[init.name] = wname
        else:
            keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = [n for extra in new_nodes_before.values() for n in extra]
    for n in g.node:
        for k, name in enumerate(n.input):
            if name in renames:
                n.input[k] = renames[name]
        if n.op_type == "QMoE":
            _point_experts(n, experts, weights)
        if n.name.startswith(("/layers.", "/norm", "/embed_tokens")):
            n.name = "/model" + n.name
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    # traced at a small vocabulary (see decoder.trace_stub): give logits their real size
    logits = next(o for o in g.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[2].dim_value = vocab_size
    model.ir_version = IR_VERSION
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", OPSET)])
    if any(n.domain == "com.microsoft" for n in g.node):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.producer_name, model.producer_version = "edge-sdk", ""
    g.name = "edge-sdk-decoder"
    del model.graph.value_info[:]
    return model


def _point_experts(node, experts: dict[str, tuple[str, str, int]], weights: dict) -> None:
    """QMoE's fc1 (input 2) and fc2 (input 5) -> the stored uint4 experts, their scales in the next input."""
    from onnx import helper

    fc = []
    for k in (2, 5):
        if node.input[k] not in experts:
            raise _experts_error(node, f"input {node.input[k]!r} is not a layer's stacked int4 experts")
        fc.append(experts[node.input[k]])
    group = _check_experts(node, fc, weights)
    for k, (qname, scales, _) in zip((2, 5), fc):
        node.input[k], node.input[k + 1] = qname, scales
    node.attribute.append(helper.make_attribute("block_size", group))


def _check_experts(node, fc: list, weights: dict) -> int:
    """fc1 [E, 2I, H] and fc2 [E, H, I] as stored: uint4 bytes [E, out, in / 2], fp16 scales [E, out, in / g],
    one g (QMoE's block_size). Returns g."""
    tensors = weights["tensors"]
    shapes = []
    for qname, _, group in fc:
        for name in (qname, qname.removesuffix(".qweight") + ".scales"):
            if name not in tensors:
                raise _experts_error(node, f"{name} is not in the weights file")
        q, sc = (list(tensors[n]["shape"]) for n in (qname, qname.removesuffix(".qweight") + ".scales"))
        if len(q) != 3 or sc != [*q[:2], q[2] * 2 // group] or (q[2] * 2) % group:
            raise _experts_error(node, f"{qname} {q} with scales {sc} is not [E, out, in / 2] with [E, out, in / {group}]")
        shapes.append(q)
    (e1, up, h), (e2, hidden, i) = shapes
    if e1 != e2:
        raise _experts_error(node, f"{e1} experts in gate_up_proj, {e2} in down_proj")
    if (up, hidden) != (4 * i, 2 * h):
        raise _experts_error(node, f"gate_up_proj {shapes[0]} and down_proj {shapes[1]} are not [E, 2I, H / 2] and [E, H, I / 2]")
    if fc[0][2] != fc[1][2]:
        raise _experts_error(node, f"block size {fc[0][2]} for gate_up_proj, {fc[1][2]} for down_proj (QMoE takes one)")
    return fc[0][2]


def _experts_error(node, what: str):
    from edge_sdk.errors import ConversionError

    return ConversionError(f"QMoE {node.name}: {what}", hint="the weights file and the graph come from different conversions; convert again")


def _external(name: str, dtype, weights: dict, weights_file: str):
    from onnx import TensorProto

    meta = weights["tensors"].get(name)
    if meta is None:
        from edge_sdk.errors import ConversionError

        raise ConversionError(f"the graph reads {name}, which is not in the weights file",
                              hint="the weights file and the graph come from different conversions; convert again")
    t = TensorProto(name=name, data_type=dtype, dims=meta["shape"])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", weights_file), ("offset", str(meta["offset"])), ("length", str(meta["nbytes"]))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def stored_tensors(weights: dict[str, torch.Tensor], quantized: dict[str, QuantizedLinear], arch, num_layers: int) -> tuple[list[StoredTensor], set[str]]:
    """What goes into the weights file: int4 + fp16 scales for quantized linears (layout [in, out],
    scales [in / g, out]), fp16 for everything else. Returns the tensors and the fp16 names."""
    out: list[StoredTensor] = []
    fp16: set[str] = set()

    def half(name, transpose=False):
        t = weights[name].to(torch.float16)
        t = (t.t() if transpose else t).contiguous()  # lm_head feeds MatMul as [in, out]
        fp16.add(name)
        out.append(StoredTensor(name, t.numpy().tobytes(), "float16", tuple(t.shape)))

    def quant(module):
        ql = quantized[module]
        q_t = ql.q.t().contiguous()  # [in, out]
        s_t = ql.scales.t().contiguous()  # [in / g, out]
        out.append(StoredTensor(f"{module}.qweight", pack_int4(q_t), "int4", tuple(q_t.shape)))
        out.append(StoredTensor(f"{module}.scales", s_t.numpy().tobytes(), "float16", tuple(s_t.shape)))

    half(arch.embed)
    for i in range(num_layers):
        half(arch.norm(i, "input_norm"))
        for p in ATTN:
            quant(arch.linear(i, p))
            if f"{arch.linear(i, p)}.bias" in weights:
                half(f"{arch.linear(i, p)}.bias")
        half(arch.norm(i, "post_attn_norm"))
        for p in ("gate_proj", "up_proj", "down_proj"):
            quant(arch.linear(i, p))
    half(arch.final_norm)
    if "lm_head" in quantized:
        quant("lm_head")
    elif arch.lm_head in weights:
        half(arch.lm_head, transpose=True)
    return out, fp16


def save(model, path: Path) -> None:
    """Deterministic serialisation (same graph, same bytes)."""
    path.write_bytes(model.SerializeToString(deterministic=True))
