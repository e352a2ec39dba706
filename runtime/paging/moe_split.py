"""Split a MoE bundle's graph at its routed experts, so the experts can be paged one by one.

The DeepSeek-V2 / V3 graph computes each MoE layer's routed experts in one com.microsoft QMoE node
that reads the layer's whole stack of experts. Expert paging runs the graph without those nodes:

- segment 0: the graph up to the first MoE layer's router (attention, dense layers, shared experts of
  that layer, the router's weights);
- segment j (1..n): from QMoE j's output to QMoE j+1's inputs (or to the logits and last presents);
- between segments the host computes the routed experts the router chose (runtime/paging/experts.py)
  from the node's two activations: the normalised hidden state `x` [N, hidden] and the routing weights
  `w` [N, experts] (0 outside each token's top-k), and hands the result on as the node's output.

The embedding lookup is taken out too (rows are read from the weights file per token), so neither
the table nor its fp32 copy is ever held. Activations that cross a cut go through the host; static
subgraphs (constants, dequantized or cast weights) are copied into each segment that reads them. Needs only `onnx` (protobuf; no torch).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from edge_sdk.errors import BundleError, require

from .surgery import EMBED

QMOE_LAYER = re.compile(r"layers\.(\d+)/")
# what experts.py computes; anything else in a QMoE node is refused before a session is built
QMOE_ATTRS = {"expert_weight_bits": 4, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 0,
              "use_sparse_mixer": 0}


@dataclasses.dataclass(frozen=True)
class MoENode:
    layer: int
    x: str  # [N, hidden] input of the experts
    w: str  # [N, experts] routing weights, 0 outside the top-k
    out: str  # [N, hidden] what the host hands on
    k: int
    block_size: int
    gate_up: tuple[str, str]  # initializer names: uint4 [E, 2I, H/2], scales [E, 2I, H/block]
    down: tuple[str, str]  # uint4 [E, H, I/2], scales [E, H, I/block]
    alpha: float = 1.0
    beta: float = 0.0


@dataclasses.dataclass
class Segment:
    model: bytes  # serialized ModelProto
    inputs: list[str]  # every input it reads (graph inputs, host tensors)
    outputs: list[str]  # every output the host keeps (cut tensors, logits, presents)


@dataclasses.dataclass
class MoESplit:
    segments: list[Segment]  # len(moe) + 1
    moe: list[MoENode]
    embedding: str  # the tensor the host fills with embedding rows (float32)
    elem_types: dict[str, int]  # onnx element type of every host tensor


def _attrs(node) -> dict:
    onnx = require("onnx", "runtime")
    return {a.name: (v.decode() if isinstance(v := onnx.helper.get_attribute_value(a), bytes) else v) for a in node.attribute}


def _source_initializer(name: str, producers: dict, inits: set, where: str) -> str:
    """The initializer behind a QMoE weight input (directly, or through the Cast that widens the scales)."""
    if name in inits:
        return name
    node = producers.get(name)
    if node is not None and node.op_type == "Cast" and node.input[0] in inits:
        return node.input[0]
    raise BundleError(f"{where}: the expert weight {name!r} is not stored in the weights file",
                      hint="re-convert the model with this edge-sdk version")


def moe_nodes(graph, where: str) -> list[MoENode]:
    """Every QMoE node of the graph, checked to be the form experts.py computes."""
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    out = []
    for n in graph.node:
        if n.op_type != "QMoE" or n.domain != "com.microsoft":
            continue
        a = _attrs(n)
        for key, want in QMOE_ATTRS.items():
            if a.get(key, want) != want:
                raise BundleError(f"{where}: {n.name} has {key}={a.get(key)!r}; expert paging computes {key}={want!r} only",
                                  hint="run the bundle without --memory-budget, or re-convert it with this edge-sdk version")
        ins = list(n.input) + [""] * (15 - len(n.input))
        if any(ins[i] for i in (4, 7, 8, 9, 10, 11, 12, 13)) or (ins[14] and ins[14] != ins[1]):
            raise BundleError(f"{where}: {n.name} has expert biases, zero points, a third projection or separate router "
                              "weights, which expert paging does not compute",
                              hint="run the bundle without --memory-budget")
        m = QMOE_LAYER.search(n.name)
        if not m:
            raise BundleError(f"{where}: cannot tell the layer of {n.name}", hint="re-convert the model with this edge-sdk version")
        out.append(MoENode(layer=int(m.group(1)), x=ins[0], w=ins[1], out=n.output[0], k=int(a["k"]),
                           block_size=int(a["block_size"]),
                           gate_up=(_source_initializer(ins[2], producers, inits, where), _source_initializer(ins[3], producers, inits, where)),
                           down=(_source_initializer(ins[5], producers, inits, where), _source_initializer(ins[6], producers, inits, where)),
                           alpha=float(a.get("activation_alpha", 1.0)), beta=float(a.get("activation_beta", 0.0))))
    return out


def _elem_types(model, moe: list[MoENode]) -> dict[str, int]:
    """Element type of every tensor, from onnx's shape inference over a copy in which each QMoE node is an
    Identity of its input (its output has the input's type and shape)."""
    onnx = require("onnx", "runtime")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    outs = {m.out: m.x for m in moe}
    for n in copy.graph.node:
        if n.op_type == "QMoE" and n.output[0] in outs:
            x = outs[n.output[0]]
            n.ClearField("attribute")
            del n.input[:]
            n.input.append(x)
            n.op_type, n.domain = "Identity", ""
    inferred = onnx.shape_inference.infer_shapes(copy)
    types = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in inferred.graph.initializer:
        types[t.name] = t.data_type
    return types


def split(graph_path: Path, where: str | None = None) -> MoESplit:
    onnx = require("onnx", "runtime")
    where = where or str(graph_path)
    model = onnx.load(str(graph_path), load_external_data=False)
    g = model.graph
    moe = moe_nodes(g, where)
    if not moe:
        raise BundleError(f"{where}: the graph has no routed-expert (QMoE) node to page", hint="page it layer by layer instead")
    embed = [n for n in g.node if n.op_type == "Gather" and "input_ids" in n.input[1:]
             and (n.input[0] == EMBED or any(c.op_type == "Cast" and c.output[0] == n.input[0] and c.input[0] == EMBED for c in g.node))]
    if len(embed) != 1:
        raise BundleError(f"{where}: cannot find the one embedding lookup of {EMBED}", hint="re-convert the model with this edge-sdk version")
    embedding = embed[0].output[0]
    types = _elem_types(model, moe)

    producers = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    graph_inputs = {i.name: i for i in g.input}
    by_out = {m.out: m for m in moe}
    skip = {id(embed[0])} | {id(n) for n in g.node if n.op_type == "QMoE" and n.output[0] in by_out}

    # keep only what the outputs and the experts' inputs need
    need = {o.name for o in g.output} | {m.x for m in moe} | {m.w for m in moe}
    live = set()
    for n in reversed(g.node):
        if id(n) in skip or not any(o in need for o in n.output):
            continue
        live.add(id(n))
        need.update(i for i in n.input if i)

    # static nodes (no graph input or expert output upstream: constants, dequantized weights, casts of
    # weights) are copied into each segment that reads them, never passed through the host
    runtime_inputs = {i.name for i in g.input} | {embedding} | set(by_out)
    static: dict[str, object] = {}
    for n in g.node:
        if id(n) in live and not any(i in runtime_inputs or (i in producers and i not in static and id(producers[i]) in live)
                                     for i in n.input if i and i not in inits):
            static.update({o: n for o in n.output})

    # segment of every tensor: QMoE j's output starts segment j + 1 (its inputs come from an earlier one)
    level: dict[str, int] = {embedding: 0}
    node_level: dict[int, int] = {}
    for n in g.node:
        if n.op_type == "QMoE" and n.output[0] in by_out:
            m = by_out[n.output[0]]
            level[m.out] = max(level.get(m.x, 0), level.get(m.w, 0)) + 1
            continue
        if id(n) not in live or n.output[0] in static:
            continue
        lv = max((level.get(i, 0) for i in n.input if i and i not in static), default=0)
        node_level[id(n)] = lv
        for o in n.output:
            level[o] = lv
    moe_levels = [level[m.out] for m in moe]
    if moe_levels != list(range(1, len(moe) + 1)):
        raise BundleError(f"{where}: the MoE layers do not follow one another ({moe_levels})", hint="run it without --memory-budget")

    graph_outputs = {o.name for o in g.output}
    consumers_level: dict[str, int] = {}
    for n in g.node:
        if id(n) in node_level:
            for i in n.input:
                consumers_level[i] = max(consumers_level.get(i, -1), node_level[id(n)])
    for m in moe:
        for i in (m.x, m.w):
            consumers_level[i] = max(consumers_level.get(i, -1), level[m.out])

    segments = []
    for s in range(len(moe) + 1):
        nodes = [n for n in g.node if node_level.get(id(n)) == s]
        # the static nodes these read, transitively, in graph order
        want, stack = set(), [i for n in nodes for i in n.input if i in static]
        while stack:
            t = stack.pop()
            node = static[t]
            if id(node) not in want:
                want.add(id(node))
                stack.extend(i for i in node.input if i in static)
        copied = [n for n in g.node if id(n) in want]
        body = [*copied, *nodes]
        produced = {o for n in body for o in n.output}
        used = [i for n in body for i in n.input if i]
        ins = [i for i in dict.fromkeys(used) if i not in produced and i not in inits]
        outs = [o for o in dict.fromkeys(o for n in nodes for o in n.output)
                if o in graph_outputs or consumers_level.get(o, -1) > s]
        missing = [t for t in (*ins, *outs) if t not in types]
        if missing:
            raise BundleError(f"{where}: cannot type the tensors {missing[:3]} where the graph is cut", hint="run it without --memory-budget")

        def value_info(name):
            if name in graph_inputs:
                return graph_inputs[name]
            return onnx.helper.make_tensor_value_info(name, types[name], None)

        sub = onnx.helper.make_graph(body, f"segment{s}", [value_info(i) for i in ins],
                                     [onnx.helper.make_tensor_value_info(o, types[o], None) for o in outs],
                                     initializer=[inits[i] for i in dict.fromkeys(used) if i in inits])
        sm = onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        segments.append(Segment(model=sm.SerializeToString(), inputs=ins, outputs=outs))
    return MoESplit(segments=segments, moe=moe, embedding=embedding, elem_types=types)
