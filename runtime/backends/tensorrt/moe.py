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
                    if not buf.size:
                        raise ConfigError(f"{weights}: ends inside {name}", hint="the bundle is incomplete: edge-sdk verify names the file")
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
    if _attr(node, "swiglu_fusion") != 1 or _attr(node, "activation_type", b"").decode() != "swiglu":
        raise ConfigError(f"{node.name}: QMoE with activation {_attr(node, 'activation_type')!r} is not rewritten for TensorRT",
                          hint="convert the model again with this edge-sdk")
    b = _Experts(node, wsec, experts, fp16)
    outs = [b.expert(e) for e in range(b.count)]
    b.add("Sum", outs, node.output[0], "Sum")
    return b.nodes, b.inits


class _Experts:
    """Builds one MoE layer's routed experts; node and tensor names under `<QMoE's path>/trt_moe/`."""

    def __init__(self, node, wsec: dict, experts: dict[str, int], fp16: bool):
        from onnx import TensorProto

        self.wsec, self.experts, self.fp16, self.T = wsec, experts, fp16, TensorProto
        tensors = wsec["tensors"]
        self.x, self.w, self.fc1, self.fc2 = node.input[0], node.input[1], node.input[2], node.input[5]
        self.group = int(_attr(node, "block_size"))
        (self.count, self.two_i, h_half), (e2, self.hidden, i_half) = tensors[self.fc1]["shape"], tensors[self.fc2]["shape"]
        assert self.count == e2 and self.two_i == 4 * i_half and self.hidden == 2 * h_half, (tensors[self.fc1], tensors[self.fc2])
        self.path = f"{node.name.removesuffix('/QMoE') or node.name}/trt_moe"
        self.stacked = self.fc1.removesuffix(".gate_up_proj.qweight")  # model.layers.1.mlp.experts
        self.nodes, self.inits, self.raw_outputs = [], [], set(node.output)
        self.shape = self.add("Shape", [self.x], "x_shape", "x/Shape")
        self.x_in = self.add("Cast", [self.x], "x_fp16", "x/Cast", to=TensorProto.FLOAT16) if fp16 else self.x
        self.c = {k: self.const(k, v) for k, v in (("zero", None), ("0", 0), ("1", 1), ("2", 2), ("2I", self.two_i))}

    def name(self, s: str) -> str:
        return f"{self.path}/{s}"

    def const(self, key, value):
        from onnx import helper

        t = helper.make_tensor(self.name(f"const_{key}"), self.T.FLOAT if value is None else self.T.INT64,
                               [] if value is None else [1], [0.0 if value is None else value])
        self.inits.append(t)
        return t.name

    def add(self, op, inputs, out, node_name=None, into=None, **attrs) -> str:
        """A node writing `<path>/<out>` (or `out` itself when it is the QMoE's output), named `<path>/<node_name>`."""
        from onnx import helper

        out_name = out if out in self.raw_outputs else self.name(out)
        (self.nodes if into is None else into).append(helper.make_node(op, inputs, [out_name], name=self.name(node_name or out), **attrs))
        return out_name

    def expert(self, e: int) -> str:
        """If(max_n w[n, e] > 0, then: w[:, e] * expert_e(x), else: zeros) -> its output's name."""
        from onnx import helper

        start, end = self.const(f"e{e}", e), self.const(f"e{e}+1", e + 1)
        col = self.add("Slice", [self.w, start, end, self.c["1"]], f"e{e}/w", f"e{e}/w/Slice")  # [N, 1]
        peak = self.add("ReduceMax", [col], f"e{e}/w_max", f"e{e}/w/ReduceMax", keepdims=0)  # scalar
        cond = self.add("Greater", [peak, self.c["zero"]], f"e{e}/chosen", f"e{e}/Greater")
        then_nodes, else_nodes = [], []
        gate_up = self.linear(e, "gate_up", self.fc1, (self.two_i, self.hidden), self.x_in, then_nodes)  # [N, 2I]
        c = self.c  # rows interleaved: gate 0, up 0, gate 1, ...
        gate = self.add("Slice", [gate_up, c["0"], c["2I"], c["1"], c["2"]], f"e{e}/gate", f"e{e}/gate/Slice", then_nodes)
        up = self.add("Slice", [gate_up, c["1"], c["2I"], c["1"], c["2"]], f"e{e}/up", f"e{e}/up/Slice", then_nodes)
        sig = self.add("Sigmoid", [gate], f"e{e}/gate_sigmoid", f"e{e}/Sigmoid", then_nodes)
        silu = self.add("Mul", [gate, sig], f"e{e}/silu", f"e{e}/silu/Mul", then_nodes)
        act = self.add("Mul", [silu, up], f"e{e}/act", f"e{e}/act/Mul", then_nodes)
        y = self.linear(e, "down", self.fc2, (self.hidden, self.two_i // 2), act, then_nodes)  # [N, H]
        if self.fp16:
            y = self.add("Cast", [y], f"e{e}/y_fp32", f"e{e}/y/Cast", then_nodes, to=self.T.FLOAT)
        then_out = self.add("Mul", [y, col], f"e{e}/then", f"e{e}/weighted/Mul", then_nodes)
        else_out = self.add("ConstantOfShape", [self.shape], f"e{e}/else", f"e{e}/zeros", else_nodes,
                            value=helper.make_tensor("value", self.T.FLOAT, [1], [0.0]))

        def branch(ns, out):
            return helper.make_graph(ns, out.rsplit("/", 1)[-1], [], [helper.make_tensor_value_info(out, self.T.FLOAT, None)])

        return self.add("If", [cond], f"e{e}/output_0", f"e{e}/If",
                        then_branch=branch(then_nodes, then_out), else_branch=branch(else_nodes, else_out))

    def linear(self, e: int, kind: str, stacked: str, rows_cols: tuple[int, int], x: str, into: list) -> str:
        """x @ W_e^T with W_e = DequantizeLinear(INT4 [out, in], fp16 scales [out, in / g], axis 1): slices of
        the converted experts file and of the bundle's weights file."""
        rows, cols = rows_cols
        qname, sname = f"{self.stacked}.{e}.{kind}_proj.qweight", f"{self.stacked}.{e}.{kind}_proj.scales"
        q_bytes = self.wsec["tensors"][stacked]["nbytes"] // self.count
        smeta = self.wsec["tensors"][stacked.removesuffix(".qweight") + ".scales"]
        s_bytes = smeta["nbytes"] // self.count
        q_at, s_at = self.experts[stacked] + e * q_bytes, smeta["offset"] + e * s_bytes
        self.inits += [_external(qname, self.T.INT4, (rows, cols), EXPERTS_FILE, q_at, q_bytes),
                       _external(sname, self.T.FLOAT16, (rows, cols // self.group), self.wsec["file"], s_at, s_bytes)]
        if not self.fp16:
            sname = self.add("Cast", [sname], f"e{e}/{kind}/scales_fp32", f"e{e}/{kind}/scales/Cast", into, to=self.T.FLOAT)
        w = self.add("DequantizeLinear", [qname, sname], f"e{e}/{kind}/DequantizeLinear/output_0",
                     f"e{e}/{kind}/DequantizeLinear", into, axis=1, block_size=self.group)  # [out, in]
        return self.add("Gemm", [x, w], f"e{e}/{kind}/Gemm/output_0", f"e{e}/{kind}/Gemm", into, transB=1)  # [N, out]


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
