"""The bundle's decoder rebuilt from onnxruntime's fused operators, for its CPU provider.

The bundle's graph uses standard ONNX operators only, so TensorRT and any onnxruntime provider can
run it. onnxruntime's CPU provider, though, spends a large part of a decode step in the ~80 small
shape, mask and rotary nodes per layer that the standard form needs. This module writes the same
model with onnxruntime's contrib operators, one to a few nodes per block:

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization   (RMSNorm, fused residual add)
    MatMulNBits                                       (int4 linears, q/k/v as one, gate/up as one)
    RotaryEmbedding, GroupQueryAttention                              (rotary; KV append, causal GQA)

It is built on the device from the bundle's verified weights file, never shipped: the int4 weights
are repacked into MatMulNBits' layout ([out, in / block, block / 2] bytes, zero point 8; exact, the
values are the bundle's q * scale bit for bit) into a sidecar file in the engine cache. The embedding
table stays in the bundle's weights file: the backend reads each step's rows (EmbeddingRows) and
feeds them as `inputs_embeds` (no copy of the table on disk or in memory). Otherwise the I/O is the bundle's
(attention_mask, position_ids, past/present BHSD), so KV caches, batching and left padding work
unchanged: padded keys are masked through GroupQueryAttention's attention_bias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edge_sdk.errors import require


log = logging.getLogger("edge_sdk.runtime")

BUILDER_VERSION = 4  # bump when the graph or the sidecar layout changes: old entries are rebuilt
ALIGN = 4096
DEFAULT_POSITIONS = 32768  # rotary table rows when the model allows more (a larger max_seq_len extends it)
GRAPH_NAME = "fused-level{level}.onnx"
WEIGHTS_NAME = "fused.weights"
METADATA = "fused.json"
MASK_MIN = float(np.finfo(np.float32).min)

ATTN = ("q_proj", "k_proj", "v_proj")
EMBED = "model.embed_tokens.weight"


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Shape":
        a = manifest["architecture"]
        return cls(int(a["hidden_size"]), int(a["num_layers"]), int(a["num_heads"]), int(a["num_kv_heads"]),
                   int(a["head_dim"]), int(a["intermediate_size"]), int(a["vocab_size"]), float(a["rms_norm_eps"]))


def supported(manifest: dict) -> str | None:
    """None when the fused graph can be built for this bundle, else why not."""
    a = manifest.get("architecture", {})
    w = manifest.get("weights", {}).get("tensors", {})
    if a.get("name") not in ("Qwen2ForCausalLM", "LlamaForCausalLM"):
        return f"architecture {a.get('name')} has no fused form"
    if manifest.get("quantization", {}).get("symmetric") is not True:
        return "only symmetric int4 weights are repacked"
    if "model.layers.0.self_attn.q_proj.qweight" not in w:
        return "the bundle's weights section does not name its int4 tensors"
    if manifest["graphs"].get("fp32") is None:
        return "the fused graph computes in float32 and needs the bundle's fp32 graph"
    return None



# --- graph ---------------------------------------------------------------------------------------------------------


class _Builder:
    """Collects nodes and initializers of one fused graph (the whole model, one layer, or the tail)."""

    MS = "com.microsoft"

    def __init__(self, s: Shape, tensors: dict, accuracy_level: int, placeholders: bool = False):
        onnx = require("onnx", "runtime")
        self.onnx, self.s, self.tensors, self.level = onnx, s, tensors, accuracy_level
        # initializers the session is given from memory (SessionOptions.add_initializer); they name the
        # sidecar's weights file only because onnxruntime wants an existing file there. Nothing reads it as
        # long as the session is built without optimizers (constant folding would: build_tail_graph)
        self.placeholders = placeholders
        self.nodes, self.inits = [], []
        self.dtypes = {"uint8": onnx.TensorProto.UINT8, "float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}

    def init(self, name: str, key: str | None = None) -> str:
        TensorProto = self.onnx.TensorProto
        t = self.tensors[key or name]
        p = TensorProto(name=name, data_type=self.dtypes[t["dtype"]], dims=t["shape"])
        p.data_location = TensorProto.EXTERNAL
        where = (("location", WEIGHTS_NAME),) if self.placeholders else (
            ("location", t["file"]), ("offset", str(t["offset"])), ("length", str(t["nbytes"])))
        for k, v in where:
            e = p.external_data.add()
            e.key, e.value = k, v
        self.inits.append(p)
        return name

    def const(self, name: str, value) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op, inputs, outputs, name, domain="", **attrs):
        self.nodes.append(self.onnx.helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def matmul(self, x, prefix, k, n, name, bias=None):
        b, sc = self.init(f"{prefix}.B"), self.init(f"{prefix}.scales")
        block = self.tensors[f"{prefix}.B"]["shape"][2] * 2
        ins = [x, b, sc] + (["", "", bias] if bias else [])
        return self.node("MatMulNBits", ins, [f"{name}/out"], name, self.MS, K=k, N=n, bits=4, block_size=block,
                         accuracy_level=self.level)

    def mask_inputs(self, like: str) -> None:
        """/seqlens_k, /total_len and /attn_bias (0 or MASK_MIN per key) from attention_mask."""
        TP, node, const = self.onnx.TensorProto, self.node, self.const
        node("Shape", ["attention_mask"], ["/total64"], "/mask/Shape", start=1, end=2)
        node("Cast", ["/total64"], ["/total32"], "/mask/Cast", to=TP.INT32)
        node("Squeeze", ["/total32"], ["/total_len"], "/mask/Squeeze")
        node("Shape", [like], ["/batch64"], "/hidden/Shape", start=0, end=1)
        node("Sub", ["/total32", const("/one32", np.array([1], np.int32))], ["/last32"], "/mask/Sub")
        node("Expand", ["/last32", "/batch64"], ["/seqlens_k"], "/mask/Expand")
        node("Cast", ["attention_mask"], ["/mask_bool"], "/mask/CastBool", to=TP.BOOL)
        node("Where", ["/mask_bool", const("/zero", np.array(0.0, np.float32)), const("/min", np.array(MASK_MIN, np.float32))],
             ["/mask_add"], "/mask/Where")
        node("Unsqueeze", ["/mask_add", const("/axes12", np.array([1, 2], np.int64))], ["/mask_b11t"], "/mask/Unsqueeze")
        node("Shape", [like], ["/seq64"], "/hidden/ShapeSeq", start=1, end=2)
        node("Concat", ["/batch64", const("/one64", np.array([1], np.int64)), "/seq64", "/total64"], ["/bias_shape"], "/mask/Concat", axis=0)
        node("Expand", ["/mask_b11t", "/bias_shape"], ["/attn_bias"], "/mask/ExpandBias")
        s = self.s
        const("/qkv_split", np.array([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], np.int64))
        const("/gate_up_split", np.array([s.intermediate, s.intermediate], np.int64))

    def layer(self, p: str, n_: str, residual: str, pending: str | None, cos: str, sin: str, past: tuple[str, str],
              present: tuple[str, str], qkv_bias: bool) -> tuple[str, str]:
        """One decoder layer; weights named `{p}.<role>`. Returns (residual, pending) for the next."""
        s, node, init, matmul, ms = self.s, self.node, self.init, self.matmul, self.MS
        h, kv, q = s.hidden, s.kv_heads * s.head_dim, s.heads * s.head_dim
        if pending is None:
            normed = node("SimplifiedLayerNormalization", [residual, init(f"{p}.input_layernorm")], [f"{n_}/input_norm/out"],
                          f"{n_}/input_norm", epsilon=s.eps, axis=-1, stash_type=1)
        else:
            normed, _, _, residual = node("SkipSimplifiedLayerNormalization", [pending, residual, init(f"{p}.input_layernorm")],
                                          [f"{n_}/input_norm/out", "", "", f"{n_}/input_norm/sum"], f"{n_}/input_norm", ms, epsilon=s.eps)
        bias = init(f"{p}.qkv.bias") if qkv_bias else None
        qkv = matmul(normed, f"{p}.qkv", h, q + 2 * kv, f"{n_}/attn/qkv_proj/MatMulNBits", bias)
        # rotary outside attention: it follows position_ids in every step (left-padded rows included),
        # so the cache holds exactly the keys the bundle's graph would
        qs, ks, vs = node("Split", [qkv, "/qkv_split"], [f"{n_}/attn/q", f"{n_}/attn/k", f"{n_}/attn/v"], f"{n_}/attn/Split", axis=-1)
        qs = node("RotaryEmbedding", [qs, "position_ids", cos, sin], [f"{n_}/attn/q_rot"], f"{n_}/attn/q_rotary", ms,
                  num_heads=s.heads, interleaved=0)
        ks = node("RotaryEmbedding", [ks, "position_ids", cos, sin], [f"{n_}/attn/k_rot"], f"{n_}/attn/k_rotary", ms,
                  num_heads=s.kv_heads, interleaved=0)
        attn = node("GroupQueryAttention", [qs, ks, vs, past[0], past[1], "/seqlens_k", "/total_len", "", "", "", "/attn_bias"],
                    [f"{n_}/attn/out", present[0], present[1]], f"{n_}/attn/GroupQueryAttention", ms,
                    num_heads=s.heads, kv_num_heads=s.kv_heads, scale=float(s.head_dim ** -0.5))[0]
        o = matmul(attn, f"{p}.self_attn.o_proj", q, h, f"{n_}/attn/o_proj/MatMulNBits")
        normed, _, _, residual = node("SkipSimplifiedLayerNormalization", [o, residual, init(f"{p}.post_attention_layernorm")],
                                      [f"{n_}/post_attn_norm/out", "", "", f"{n_}/post_attn_norm/sum"], f"{n_}/post_attn_norm", ms, epsilon=s.eps)
        gate_up = matmul(normed, f"{p}.mlp.gate_up", h, 2 * s.intermediate, f"{n_}/mlp/gate_up_proj/MatMulNBits")
        gate, up = node("Split", [gate_up, "/gate_up_split"], [f"{n_}/mlp/gate", f"{n_}/mlp/up"], f"{n_}/mlp/Split", axis=-1)
        # SiLU as onnxruntime's own fusion of Sigmoid and Mul writes it: the graph needs no optimizer
        act = node("QuickGelu", [gate], [f"{n_}/mlp/silu/out"], f"{n_}/mlp/silu", ms, alpha=1.0)
        act = node("Mul", [act, up], [f"{n_}/mlp/gated/out"], f"{n_}/mlp/gated")
        return residual, matmul(act, f"{p}.mlp.down_proj", s.intermediate, h, f"{n_}/mlp/down_proj/MatMulNBits")

    def tail(self, residual: str, pending: str) -> str:
        s, node = self.s, self.node
        final = node("SkipSimplifiedLayerNormalization", [pending, residual, self.init("model.norm")], ["/model/norm/out"],
                     "/model/norm", self.MS, epsilon=s.eps)
        if "lm_head.B" in self.tensors:
            logits = self.matmul(final, "lm_head", s.hidden, s.vocab, "/lm_head/MatMulNBits")
        else:
            w = node("Cast", [self.init("lm_head.fp16")], ["/lm_head/weight"], "/lm_head/Cast", to=self.onnx.TensorProto.FLOAT)
            logits = node("MatMul", [final, w], ["/lm_head/out"], "/lm_head/MatMul")
        return node("Identity", [logits], ["logits"], "/logits")

    def model(self, name: str, inputs: list, outputs: list):
        helper = self.onnx.helper
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(self.MS, 1)],
                              producer_name="edge-sdk")
        m.ir_version = 10
        return m


def _vi(name: str, elem: int, dims: list):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, dims)


def build_graph(s: Shape, tensors: dict, accuracy_level: int, *, qkv_bias: bool):
    """The whole decoder: inputs_embeds, attention_mask, position_ids, past -> logits, present."""
    b = _Builder(s, tensors, accuracy_level)
    TP = b.onnx.TensorProto
    b.mask_inputs("inputs_embeds")
    residual, pending = "inputs_embeds", None
    cos, sin = b.init("rope.cos"), b.init("rope.sin")
    for i in range(s.layers):
        residual, pending = b.layer(f"model.layers.{i}", f"/model/layers.{i}", residual, pending, cos, sin,
                                    (f"past_key_values.{i}.key", f"past_key_values.{i}.value"),
                                    (f"present.{i}.key", f"present.{i}.value"), qkv_bias)
    b.tail(residual, pending)
    f32, i64 = TP.FLOAT, TP.INT64
    kv_in = [_vi(f"past_key_values.{i}.{k}", f32, ["batch", s.kv_heads, "past_seq", s.head_dim]) for i in range(s.layers) for k in ("key", "value")]
    kv_out = [_vi(f"present.{i}.{k}", f32, ["batch", s.kv_heads, "total_seq", s.head_dim]) for i in range(s.layers) for k in ("key", "value")]
    return b.model("edge-sdk-decoder-fused",
                   [_vi("inputs_embeds", f32, ["batch", "seq", s.hidden]), _vi("attention_mask", i64, ["batch", "total_seq"]),
                    _vi("position_ids", i64, ["batch", "seq"]), *kv_in],
                   [_vi("logits", f32, ["batch", "seq", s.vocab]), *kv_out])


# single-layer and tail graphs of the layer-streamed executor (runtime/paging/fused.py): weights are
# placeholders the session fills from memory; layers pass (residual, pending) on, the first one
# with pending = 0 (SkipSimplifiedLayerNormalization then adds exactly nothing)
def build_layer_graph(s: Shape, roles: dict, accuracy_level: int, *, qkv_bias: bool):
    """roles: {role (e.g. 'qkv.B', 'input_layernorm'): tensor meta} of any one layer."""
    b = _Builder(s, {f"layer.{r}": t for r, t in roles.items()}, accuracy_level, placeholders=True)
    TP = b.onnx.TensorProto
    b.mask_inputs("residual")
    residual, pending = b.layer("layer", "/layer", "residual", "pending", "rope.cos", "rope.sin", ("past_key", "past_value"),
                                ("present_key", "present_value"), qkv_bias)
    b.node("Identity", [residual], ["residual_out"], "/residual_out")
    b.node("Identity", [pending], ["pending_out"], "/pending_out")
    f32, i64 = TP.FLOAT, TP.INT64
    half = s.head_dim // 2
    return b.model("edge-sdk-layer-fused",
                   [_vi("residual", f32, ["batch", "seq", s.hidden]), _vi("pending", f32, ["batch", "seq", s.hidden]),
                    _vi("attention_mask", i64, ["batch", "total_seq"]), _vi("position_ids", i64, ["batch", "seq"]),
                    _vi("rope.cos", f32, ["positions", half]), _vi("rope.sin", f32, ["positions", half]),
                    _vi("past_key", f32, ["batch", s.kv_heads, "past_seq", s.head_dim]),
                    _vi("past_value", f32, ["batch", s.kv_heads, "past_seq", s.head_dim])],
                   [_vi("residual_out", f32, ["batch", "seq", s.hidden]), _vi("pending_out", f32, ["batch", "seq", s.hidden]),
                    _vi("present_key", f32, ["batch", s.kv_heads, "total_seq", s.head_dim]),
                    _vi("present_value", f32, ["batch", s.kv_heads, "total_seq", s.head_dim])])


def build_tail_graph(s: Shape, tensors: dict, accuracy_level: int):
    """Final norm and lm_head. Unlike the layer graph its initializers name their real place in the
    sidecar: the session is optimized, and onnxruntime's constant folding (an fp16 lm_head's Cast) reads
    initializers from there before the ones given from memory take their place."""
    b = _Builder(s, tensors, accuracy_level)
    f32 = b.onnx.TensorProto.FLOAT
    b.tail("residual", "pending")
    return b.model("edge-sdk-tail-fused",
                   [_vi("residual", f32, ["batch", "seq", s.hidden]), _vi("pending", f32, ["batch", "seq", s.hidden])],
                   [_vi("logits", f32, ["batch", "seq", s.vocab])])
