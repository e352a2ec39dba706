"""DeepSeek-V2 / V3 routed experts for TensorRT: the bundle's QMoE graph rewritten to standard ONNX ops
at engine build, on the device, from the bundle's own weights (nothing is added to the bundle).

Why not the bundle's graph as is: TensorRT's ONNX parser has no importer for onnxruntime's
`com.microsoft::QMoE` (onnx-tensorrt docs/operators.md lists standard-domain ops only), and TensorRT's
INT4 is weight-only: DequantizeLinear on a build-time-constant signed INT4 tensor with zero point 0,
block-quantized only in 2-D with a 2-D build-time-constant scale (IDequantizeLayer: "scale ... a 2-D
tensor for block quantization (supported for DataType::kINT4 only)"; "zeroPt must only contain
zero-valued coefficients"), feeding a GEMM. TensorRT's own MoE layer (IMoELayer, 10.16) runs on SM100,
SM103 and SM110 with NVFP4 weights only, not on Orin (SM87) nor with INT4.

Formulation: every routed expert is two 2-D INT4 GEMMs inside an `If` whose condition is "a token of
this step chose the expert" (its routing weight, zero outside each token's top-k, is > 0):

    y = sum over experts e of  If(max_n w[n, e] > 0,
                                 then: w[:, e] * down_e(silu(gate_e(x)) * up_e(x))   fp16 GEMMs on INT4 DQ
                                 else: 0)

A TensorRT conditional executes the subgraph its condition selects (IIfConditional: "trueSubgraph is
executed when condition is evaluated to True"), so a step reads the INT4 bytes of the experts its tokens
chose: k experts per token at decode, the union of the tokens' choices in a prefill chunk, as QMoE.
The rejected alternatives: all experts as DQ -> MatMul masked by the routing weights (reads every
expert, E / k times the bytes: 64 / 6 on V2-Lite); a Gather of the chosen experts' weights (Gather takes
no INT4 input and DequantizeLinear's scale must be a build-time constant, so only fp16 weights could be
gathered: 4x the memory); a plugin (TensorRT-LLM's MixtureOfExperts, TensorRT Edge-LLM's Int4MoePlugin)
is not part of TensorRT and its library is not on the device image.

Weights: the bundle stores each layer's experts stacked for QMoE as uint4 with zero point 8 (q + 8),
[E, out, in / 2], two per byte along `in`, low nibble first, which is ONNX's INT4 packing of [E, out, in].
q + 8 XOR 8 is q in two's complement for every q in [-8, 7], so the build writes the stored bytes XOR
0x88 into a scratch file beside the rewritten graph; expert e's INT4 initializer [out, in] is a slice of
it, its fp16 scales [out, in / g] a slice of model.weights (blocked along `in`, axis 1), and the GEMM
takes the weight transposed (Gemm transB=1, x [N, in]). The scratch goes once the engine is written:
the engine holds the weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from edge_sdk.errors import ConfigError

GRAPH_FILE = "model.trt.onnx"
EXPERTS_FILE = "experts.int4"  # the stored uint4 experts as signed INT4 (bytes XOR 0x88)
CHUNK = 1 << 24  # bytes per read while converting the experts


def is_moe(manifest: dict) -> bool:
    return bool(manifest.get("architecture", {}).get("moe"))


def scratch_bytes(manifest: dict) -> int:
    """Bytes write_graph puts in its directory: the stacked experts (the only uint8 tensors), once."""
    return sum(t["nbytes"] for t in manifest["weights"]["tensors"].values() if t["dtype"] == "uint8")


def write_graph(bundle: Path, graph_file: str, manifest: dict, out: Path, expert_dtype: str = "float16") -> Path:
    """out/ gets the rewritten graph, the INT4 experts and model.weights (a link); returns the graph.
    expert_dtype: the experts' GEMM activations, float16 (the engine) or float32 (to check the
    formulation against QMoE without fp16 rounding)."""
    import onnx

    model = onnx.load(str(bundle / graph_file), load_external_data=False)
    wsec = manifest["weights"]
    out.mkdir(parents=True, exist_ok=True)
    experts = _write_experts(bundle / wsec["file"], wsec, _qmoe_nodes(model.graph, bundle / graph_file), out / EXPERTS_FILE)
    rewrite(model, wsec, experts, expert_dtype)
    _link(bundle / wsec["file"], out / wsec["file"])
    path = out / GRAPH_FILE
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def _qmoe_nodes(graph, path: Path) -> list:
    nodes = [n for n in graph.node if n.op_type == "QMoE"]
    if not nodes:
        raise ConfigError(f"{path.name}: the bundle says MoE but its graph has no QMoE node",
                          hint="convert the model again with this edge-sdk")
    return nodes


def _write_experts(weights: Path, wsec: dict, nodes: list, dst: Path) -> dict[str, int]:
    """Every stacked expert tensor the QMoE nodes read, bytes XOR 0x88, into dst -> {name: offset in dst}."""
    import numpy as np

    offsets, at = {}, 0
    with open(weights, "rb") as src, open(dst, "wb") as f:
        for node in nodes:
            for name in (node.input[2], node.input[5]):
                meta = wsec["tensors"][name]
                offsets[name] = at
                src.seek(meta["offset"])
                left = meta["nbytes"]
                while left:
                    buf = np.frombuffer(src.read(min(CHUNK, left)), np.uint8)
                    f.write((buf ^ np.uint8(0x88)).tobytes())
                    left -= buf.size
                at += meta["nbytes"]
    return offsets


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)  # same file system: no copy
    except OSError:
        try:
            os.symlink(src.absolute(), dst)
        except OSError:
            shutil.copyfile(src, dst)


def rewrite(model, wsec: dict, experts: dict[str, int], expert_dtype: str = "float16") -> None:
    """Each QMoE node -> the If-per-expert formulation (module text); in place."""
    g = model.graph
    nodes, inits = [], []
    for n in g.node:
        if n.op_type == "QMoE":
            new_nodes, new_inits = _experts_subgraph(n, wsec, experts, expert_dtype == "float16")
            nodes += new_nodes
            inits += new_inits
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    _drop_unused(g)
    if not any(n.domain == "com.microsoft" for n in g.node):
        keep = [o for o in model.opset_import if o.domain != "com.microsoft"]
        del model.opset_import[:]
        model.opset_import.extend(keep)


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _external(name: str, dtype, shape, location: str, offset: int, nbytes: int):
    from onnx import TensorProto

    t = TensorProto(name=name, data_type=dtype, dims=list(shape))
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _experts_subgraph(node, wsec: dict, experts: dict[str, int], fp16: bool) -> tuple[list, list]:
    """One QMoE node -> (nodes, initializers). QMoE inputs: 0 x [N, H], 1 router weights [N, E] (0 outside
    the top-k), 2 / 5 stacked uint4 fc1 [E, 2I, H / 2] (gate and up rows interleaved) / fc2 [E, H, I / 2]."""
    from onnx import TensorProto, helper

    tensors = wsec["tensors"]
    x, w = node.input[0], node.input[1]
    fc1, fc2 = node.input[2], node.input[5]
    group = int(_attr(node, "block_size"))
    if _attr(node, "swiglu_fusion") != 1 or _attr(node, "activation_type", b"").decode() != "swiglu":
        raise ConfigError(f"{node.name}: QMoE with activation {_attr(node, 'activation_type')!r} is not rewritten for TensorRT",
                          hint="convert the model again with this edge-sdk")
    (e1, two_i, h_half), (e2, hidden, i_half) = tensors[fc1]["shape"], tensors[fc2]["shape"]
    assert e1 == e2 and two_i == 4 * i_half and hidden == 2 * h_half, (tensors[fc1]["shape"], tensors[fc2]["shape"])
    p = node.name.removesuffix("/QMoE") or node.name
    stacked = fc1.removesuffix(".gate_up_proj.qweight")  # model.layers.1.mlp.experts
    nodes, inits = [], []

    def name(s):
        return f"{p}/trt_moe/{s}"

    x16 = name("x_fp16") if fp16 else x
    if fp16:
        nodes.append(helper.make_node("Cast", [x], [x16], name=name("x/Cast"), to=TensorProto.FLOAT16))
    one = name("one")
    inits.append(helper.make_tensor(one, TensorProto.INT64, [1], [1]))
    cols, zero = name("axes1"), name("zero")
    inits += [helper.make_tensor(cols, TensorProto.INT64, [1], [1]), helper.make_tensor(zero, TensorProto.FLOAT, [], [0.0])]
    two, i_size, starts0 = name("two"), name("inter2"), name("start0")
    inits += [helper.make_tensor(two, TensorProto.INT64, [1], [2]), helper.make_tensor(i_size, TensorProto.INT64, [1], [two_i]),
              helper.make_tensor(starts0, TensorProto.INT64, [1], [0])]
    shape = name("x/Shape")
    nodes.append(helper.make_node("Shape", [x], [shape], name=name("x/Shape")))
    outs = []
    for e in range(e1):
        q = f"{stacked}.{e}"
        start, end = name(f"e{e}/start"), name(f"e{e}/end")
        inits += [helper.make_tensor(start, TensorProto.INT64, [1], [e]), helper.make_tensor(end, TensorProto.INT64, [1], [e + 1])]
        col, peak, cond = name(f"e{e}/w"), name(f"e{e}/w_max"), name(f"e{e}/chosen")
        nodes += [helper.make_node("Slice", [w, start, end, cols], [col], name=name(f"e{e}/w/Slice")),  # [N, 1]
                  helper.make_node("ReduceMax", [col], [peak], name=name(f"e{e}/w/ReduceMax"), keepdims=0),  # scalar
                  helper.make_node("Greater", [peak, zero], [cond], name=name(f"e{e}/Greater"))]
        then_nodes = []
        h = x16
        for fc, kind, out_rows, in_cols in ((fc1, "gate_up", two_i, hidden), (fc2, "down", hidden, two_i // 2)):
            qname, sname = f"{q}.{kind}_proj.qweight", f"{q}.{kind}_proj.scales"
            per_expert = tensors[fc]["nbytes"] // e1
            inits.append(_external(qname, TensorProto.INT4, (out_rows, in_cols), EXPERTS_FILE, experts[fc] + e * per_expert, per_expert))
            smeta = tensors[fc.removesuffix(".qweight") + ".scales"]
            s_bytes = smeta["nbytes"] // e1
            inits.append(_external(sname, TensorProto.FLOAT16, (out_rows, in_cols // group), wsec["file"], smeta["offset"] + e * s_bytes, s_bytes))
            dq, y = name(f"e{e}/{kind}/DequantizeLinear/output_0"), name(f"e{e}/{kind}/Gemm/output_0")
            if not fp16:
                then_nodes.append(helper.make_node("Cast", [sname], [sname + "_fp32"], name=name(f"e{e}/{kind}/scales/Cast"), to=TensorProto.FLOAT))
                sname += "_fp32"
            then_nodes += [helper.make_node("DequantizeLinear", [qname, sname], [dq], name=name(f"e{e}/{kind}/DequantizeLinear"),
                                            axis=1, block_size=group),  # [out, in] fp16
                           helper.make_node("Gemm", [h, dq], [y], name=name(f"e{e}/{kind}/Gemm"), transB=1)]  # [N, out]
            if kind == "gate_up":  # rows interleaved: gate 0, up 0, gate 1, ...
                gate, up, sig, act = (name(f"e{e}/{s}") for s in ("gate", "up", "gate_sigmoid", "act"))
                then_nodes += [helper.make_node("Slice", [y, starts0, i_size, cols, two], [gate], name=name(f"e{e}/gate/Slice")),
                               helper.make_node("Slice", [y, one, i_size, cols, two], [up], name=name(f"e{e}/up/Slice")),
                               helper.make_node("Sigmoid", [gate], [sig], name=name(f"e{e}/Sigmoid")),
                               helper.make_node("Mul", [gate, sig], [name(f"e{e}/silu")], name=name(f"e{e}/silu/Mul")),
                               helper.make_node("Mul", [name(f"e{e}/silu"), up], [act], name=name(f"e{e}/act/Mul"))]
                h = act
            else:
                y32, then_out = name(f"e{e}/y_fp32"), name(f"e{e}/then")
                if fp16:
                    then_nodes.append(helper.make_node("Cast", [y], [y32], name=name(f"e{e}/y/Cast"), to=TensorProto.FLOAT))
                then_nodes.append(helper.make_node("Mul", [y32 if fp16 else y, col], [then_out], name=name(f"e{e}/weighted/Mul")))
        else_out = name(f"e{e}/else")
        else_nodes = [helper.make_node("ConstantOfShape", [shape], [else_out], name=name(f"e{e}/zeros"),
                                       value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]))]
        out = name(f"e{e}/output_0")
        branch = lambda ns, o: helper.make_graph(ns, o.split("/")[-1], [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)])  # noqa: E731
        nodes.append(helper.make_node("If", [cond], [out], name=name(f"e{e}/If"),
                                      then_branch=branch(then_nodes, name(f"e{e}/then")), else_branch=branch(else_nodes, else_out)))
        outs.append(out)
    nodes.append(helper.make_node("Sum", outs, [node.output[0]], name=name("Sum")))
    return nodes, inits


def _drop_unused(g) -> None:
    """Remove nodes (QMoE's scale casts) and initializers (the stacked experts) nothing reads any more."""
    while True:
        used = {i for n in g.node for i in _inputs(n)} | {o.name for o in g.output}
        keep = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    used = {i for n in g.node for i in _inputs(n)}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _inputs(node):
    """A node's inputs, with what its subgraphs read from the outer scope."""
    yield from node.input
    for a in node.attribute:
        if a.g.node:
            for n in a.g.node:
                yield from _inputs(n)
