"""Split the bundle's decoder graph into the three graphs the paging executor runs.

- head: rotary tables and attention mask from `attention_mask` / `position_ids` (no weights;
  embeddings are looked up from the weights file row by row, see `EmbeddingRows` in backends/fused/graph.py);
- layer: decoder layer 0's nodes with its weights turned into graph inputs named by role
  (`self_attn.q_proj.qweight`, ...), past/present renamed `past_key` ... `present_value`, the
  residual stream `hidden_in` -> `hidden_out`; one session runs every layer;
- tail: final norm and lm_head, weights kept as external initializers in the bundle's weights file.

Every other layer must be the same computation as layer 0 (checked node by node), otherwise the
bundle cannot be paged. The graphs are cached beside the bundle (never inside it), keyed by the
bundle hash, and needs only `onnx` (protobuf; no torch).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_sdk.errors import BundleError, require

LAYER_NODE = re.compile(r"^/model/layers[./](\d+)/")
LAYER_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EMBED = "model.embed_tokens.weight"
HIDDEN_IN, HIDDEN_OUT = "hidden_in", "hidden_out"
PAST = {"key": "past_key", "value": "past_value"}
PRESENT = {"key": "present_key", "value": "present_value"}
GRAPHS_VERSION = 1


@dataclass(frozen=True)
class PagedGraphs:
    directory: str
    shared: list[str]  # tensors the head computes and every layer reads (rotary tables, mask)
    head_inputs: list[str]  # bundle graph inputs the head reads
    layer_inputs: list[str]  # bundle graph inputs each layer reads directly (besides past KV)
    roles: list[str]  # weight roles of one layer, e.g. "self_attn.q_proj.qweight"
    tail_hidden: str = HIDDEN_IN

    def path(self, name: str) -> Path:
        return Path(self.directory) / f"{name}.onnx"


def cache_dir(bundle: Path, bundle_hash: str, cache_root: str | Path | None = None) -> Path:
    root = Path(cache_root) if cache_root else Path(bundle).absolute().parent / ".edge-sdk-paging"
    return root / bundle_hash[:32]


def load_or_split(graph_path: Path, weights: dict, directory: Path) -> PagedGraphs:
    """The cached split graphs for this bundle, or split now and cache them (atomically)."""
    meta = directory / "graphs.json"
    if meta.exists():
        data = json.loads(meta.read_text())
        if data.pop("version", None) == GRAPHS_VERSION:
            return PagedGraphs(directory=str(directory), **{k: v for k, v in data.items() if k != "directory"})
    graphs = split(graph_path, weights, directory)
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": GRAPHS_VERSION, **asdict(graphs)}, sort_keys=True))
    os.replace(tmp, meta)
    return graphs


def _layer_of(node) -> int | None:
    m = LAYER_NODE.match(node.name)
    return int(m.group(1)) if m else None


def split(graph_path: Path, weights: dict, directory: Path) -> PagedGraphs:
    onnx = require("onnx", "runtime")
    model = onnx.load(str(graph_path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    by_layer: dict[int, list] = {}
    others = []
    for n in g.node:
        i = _layer_of(n)
        (by_layer.setdefault(i, []) if i is not None else others).append(n)
    if not by_layer:
        raise BundleError(f"{graph_path.name} has no nodes named /model/layers.N/...",
                          hint="paging needs a graph exported by `edge-sdk convert`; re-convert the model")
    num_layers = max(by_layer) + 1
    graph_inputs = {i.name: i for i in g.input}

    def is_const(name: str) -> bool:
        p = producer.get(name)
        return p is not None and p.op_type == "Constant" and _layer_of(p) is None

    def residual_out(i: int) -> str:
        own = {o for n in by_layer[i] for o in n.output}
        used = {x for j, nodes in by_layer.items() if j != i for n in nodes for x in n.input} | \
               {x for n in others for x in n.input}
        outs = sorted(own & used)
        if len(outs) != 1:
            raise BundleError(f"layer {i} of {graph_path.name} hands {len(outs)} tensors to the next layer, expected 1",
                              hint="this graph cannot be paged layer by layer; run it resident")
        return outs[0]

    # embedding path: every node that depends on the embedding table (Cast, Gather)
    embed_nodes, tainted = set(), {EMBED}
    for n in others:
        if any(x in tainted for x in n.input):
            embed_nodes.add(id(n))
            tainted.update(n.output)
    gathers = [n for n in others if id(n) in embed_nodes and n.op_type == "Gather"]
    if len(gathers) != 1:
        raise BundleError(f"{graph_path.name}: the embedding lookup is not one Gather", hint="re-convert the model")
    h0 = gathers[0].output[0]
    last = residual_out(num_layers - 1)
    tail_nodes, tainted = [], {last}
    for n in others:
        if any(x in tainted for x in n.input):
            tail_nodes.append(n)
            tainted.update(n.output)
    tail_nodes = _closure(others, {x for n in tail_nodes for x in n.output} & {o.name for o in g.output}, producer)

    layer0 = by_layer[0]
    res_in = {0: h0, **{i: residual_out(i - 1) for i in range(1, num_layers)}}
    canon0, shared, layer_inputs, roles = _canonical(0, layer0, res_in[0], inits, weights, producer, graph_inputs, is_const)
    for i in range(1, num_layers):
        canon = _canonical(i, by_layer[i], res_in[i], inits, weights, producer, graph_inputs, is_const)[0]
        if canon != canon0:
            raise BundleError(f"decoder layer {i} of {graph_path.name} is not the same computation as layer 0",
                              hint="paging runs every layer through layer 0's graph; run this model resident")

    directory.mkdir(parents=True, exist_ok=True)
    ir, opsets = model.ir_version, list(model.opset_import)
    h = onnx.helper

    def save(name: str, graph) -> None:
        m = h.make_model(graph, opset_imports=opsets)
        m.ir_version = ir
        tmp = directory / f"{name}.onnx.tmp"
        onnx.save(m, str(tmp))
        os.replace(tmp, directory / f"{name}.onnx")

    vinfo = _value_infos(model)
    # head: graph inputs -> shared tensors
    head_nodes = _closure(others, set(shared), producer)
    head_in = sorted({x for n in head_nodes for x in n.input if x in graph_inputs})
    save("head", h.make_graph(head_nodes, "head", [graph_inputs[x] for x in head_in],
                              [_vi(vinfo, s) for s in shared],
                              [inits[x] for x in {x for n in head_nodes for x in n.input if x in inits}]))
    # layer: layer 0's nodes, constants copied, weights as inputs named by role
    rename = {res_in[0]: HIDDEN_IN, residual_out(0): HIDDEN_OUT}
    kv_past = {}
    for x in {x for n in layer0 for x in n.input if x in graph_inputs}:
        for kind in ("key", "value"):
            if x.endswith(f".0.{kind}") and x.startswith("past"):
                rename[x], kv_past[kind] = PAST[kind], x
    for o in g.output:
        for kind in ("key", "value"):
            if o.name.endswith(f".0.{kind}") and o.name.startswith("present"):
                rename[o.name] = PRESENT[kind]
    weight_names = {}
    for x in {x for n in layer0 for x in n.input if x in inits and x in weights}:
        weight_names[x] = LAYER_WEIGHT.match(x).group(2)
        rename[x] = weight_names[x]
    consts = [producer[x] for x in sorted({x for n in layer0 for x in n.input if is_const(x)})]
    nodes = [_renamed(h, n, rename) for n in consts + layer0]
    hidden_type = _vi(vinfo, h0)
    l_inputs = [h.make_tensor_value_info(HIDDEN_IN, hidden_type.type.tensor_type.elem_type, None)]
    l_inputs += [_vi(vinfo, s) for s in shared] + [graph_inputs[x] for x in layer_inputs]
    l_inputs += [_renamed_vi(h, graph_inputs[kv_past[k]], PAST[k]) for k in ("key", "value")]
    l_inputs += [h.make_tensor_value_info(r, inits[w].data_type, list(inits[w].dims)) for w, r in sorted(weight_names.items(), key=lambda kv: kv[1])]
    outs = [h.make_tensor_value_info(HIDDEN_OUT, hidden_type.type.tensor_type.elem_type, None)]
    outs += [_renamed_vi(h, next(o for o in g.output if rename.get(o.name) == PRESENT[k]), PRESENT[k]) for k in ("key", "value")]
    layer_inits = [inits[x] for x in {x for n in layer0 for x in n.input if x in inits and x not in weights}]
    save("layer", h.make_graph(nodes, "layer", l_inputs, outs, layer_inits))
    # tail: last residual -> logits
    t_nodes = [_renamed(h, n, {last: HIDDEN_IN}) for n in tail_nodes]
    t_inits = [inits[x] for x in {x for n in tail_nodes for x in n.input if x in inits}]
    logits = [o for o in g.output if o.name == "logits"]
    save("tail", h.make_graph(t_nodes, "tail",
                              [h.make_tensor_value_info(HIDDEN_IN, hidden_type.type.tensor_type.elem_type, None)],
                              logits, t_inits))
    return PagedGraphs(str(directory), shared, head_in, layer_inputs, sorted(weight_names.values()))


def _closure(nodes: list, wanted: set, producer: dict) -> list:
    """The nodes of `nodes` needed to compute `wanted`, in graph order."""
    pool = {id(n) for n in nodes}
    need, todo = set(), list(wanted)
    while todo:
        p = producer.get(todo.pop())
        if p is not None and id(p) in pool and id(p) not in need:
            need.add(id(p))
            todo.extend(p.input)
    return [n for n in nodes if id(n) in need]


def _canonical(i, nodes, res_in, inits, weights, producer, graph_inputs, is_const):
    """Layer i's computation with names replaced by roles: equal lists = the same layer."""
    local = {}
    shared, layer_inputs, roles, out = [], [], [], []
    prefix = f"model.layers.{i}."
    for k, n in enumerate(nodes):
        for j, o in enumerate(n.output):
            local[o] = f"n{k}.{j}"
    for n in nodes:
        ins = []
        for x in n.input:
            if x == res_in:
                ins.append("hidden")
            elif x in local:
                ins.append(local[x])
            elif x in inits and x in weights:
                if not x.startswith(prefix):
                    raise BundleError(f"layer {i} reads another layer's weight {x}", hint="re-convert the model")
                roles.append(x[len(prefix):])
                ins.append(f"w:{x[len(prefix):]}:{tuple(inits[x].dims)}")
            elif x in inits:
                ins.append(f"c:{inits[x].SerializeToString().hex()}")
            elif is_const(x):
                ins.append(f"c:{producer[x].attribute[0].SerializeToString().hex()}")
            elif x in graph_inputs:
                m = re.match(rf"^past[^.]*\.{i}\.(key|value)$", x) or re.match(rf"^past_key_values\.{i}\.(key|value)$", x)
                if m:
                    ins.append(f"past.{m.group(1)}")
                else:
                    ins.append(f"in:{x}")
                    layer_inputs.append(x)
            elif x == "":
                ins.append("")
            else:
                ins.append(f"s:{x}")
                shared.append(x)
        attrs = [a.SerializeToString().hex() for a in n.attribute]
        out.append((n.op_type, n.domain, tuple(ins), tuple(attrs), len(n.output)))
    return out, sorted(set(shared)), sorted(set(layer_inputs)), sorted(set(roles))


def _value_infos(model) -> dict:
    onnx = require("onnx", "runtime")
    vi = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    if len(vi) < len(model.graph.node):  # shapes not stored: infer them (weights stay on disk)
        inferred = onnx.shape_inference.infer_shapes(model)
        vi.update({v.name: v for v in inferred.graph.value_info})
    return vi


def _vi(vinfo: dict, name: str):
    if name not in vinfo:
        raise BundleError(f"no type known for tensor {name} of the bundle graph", hint="re-convert the model")
    return vinfo[name]


def _renamed_vi(h, vi, name: str):
    t = vi.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    return h.make_tensor_value_info(name, t.elem_type, dims)


def _renamed(h, node, rename: dict):
    n = h.make_node(node.op_type, [rename.get(x, x) for x in node.input], [rename.get(x, x) for x in node.output],
                    name=node.name, domain=node.domain or None)
    n.attribute.extend(node.attribute)
    return n
