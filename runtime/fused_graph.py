"""The bundle's decoder rebuilt from onnxruntime's fused operators, for its CPU provider.

The bundle's graph uses standard ONNX operators only, so TensorRT and any onnxruntime provider can
run it. onnxruntime's CPU provider, though, spends a large part of a decode step in the ~80 small
shape, mask and rotary nodes per layer that the standard form needs. This module writes the same
model with onnxruntime's contrib operators, one to a few nodes per block:

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization   (RMSNorm, fused residual add)
    MatMulNBits                                                       (int4 linears, q/k/v as one)
    RotaryEmbedding, GroupQueryAttention                              (rotary; KV append, causal GQA)

It is built on the device from the bundle's verified weights file, never shipped: the int4 weights
are repacked into MatMulNBits' layout ([out, in / block, block / 2] bytes, zero point 8; exact, the
values are the bundle's q * scale bit for bit) into a sidecar file in the engine cache. The embedding
table stays in the bundle's weights file: the backend maps it and feeds each step's rows as
`inputs_embeds` (no copy of the table on disk or in memory). Otherwise the I/O is the bundle's
(attention_mask, position_ids, past/present BHSD), so KV caches, batching and left padding work
unchanged: padded keys are masked through GroupQueryAttention's attention_bias.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.errors import BundleError, require
from edge_sdk.fsutil import fsync_path

BUILDER_VERSION = 1  # bump when the graph or the sidecar layout changes: old entries are rebuilt
ALIGN = 4096
DEFAULT_POSITIONS = 32768  # rotary table rows when the model allows more (a larger max_seq_len extends it)
GRAPH_NAME = "fused-level{level}.onnx"
WEIGHTS_NAME = "fused.weights"
METADATA = "fused.json"
MASK_MIN = float(np.finfo(np.float32).min)

ATTN = ("q_proj", "k_proj", "v_proj")


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


def key(bundle_hash: str, ort_version: str) -> str:
    return hashlib.sha256(f"{bundle_hash}:{ort_version}:{BUILDER_VERSION}".encode()).hexdigest()[:16]


def embedding(bundle: Path, manifest: dict) -> np.ndarray:
    """The fp16 embedding table [vocab, hidden], mapped read-only from the bundle's weights file."""
    w = manifest["weights"]
    t = w["tensors"]["model.embed_tokens.weight"]
    path = Path(bundle) / w["file"]
    if path.stat().st_size < t["offset"] + t["nbytes"]:
        raise BundleError(f"{path.name} is shorter than the manifest says (the embeddings end at byte {t['offset'] + t['nbytes']})",
                          hint="the bundle is truncated: copy it again and run `edge-sdk verify`")
    return np.memmap(path, np.float16, mode="r", offset=t["offset"], shape=tuple(t["shape"]))


def ensure(bundle: Path, manifest: dict, bundle_hash: str, cache_root: Path, accuracy_level: int, max_positions: int) -> Path:
    """Path of the fused graph for this bundle and accuracy level, built into the cache when missing."""
    ort = require("onnxruntime", "runtime")
    d = Path(cache_root) / "ort-fused" / key(bundle_hash, ort.__version__)
    meta = d / METADATA
    if not _valid(d, bundle_hash, max_positions):
        _build_weights(Path(bundle), manifest, d, bundle_hash, max_positions)
    graph = d / GRAPH_NAME.format(level=accuracy_level)
    if not graph.is_file():
        model = build_graph(Shape.from_manifest(manifest), json.loads(meta.read_text())["tensors"], accuracy_level,
                            qkv_bias=_has_qkv_bias(manifest))
        _write_atomic(graph, model.SerializeToString(deterministic=True))
    return graph


def _valid(d: Path, bundle_hash: str, max_positions: int) -> bool:
    try:
        meta = json.loads((d / METADATA).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    w = d / WEIGHTS_NAME
    return (meta.get("bundle_hash") == bundle_hash and meta.get("builder_version") == BUILDER_VERSION
            and meta.get("max_positions", 0) >= max_positions and w.is_file() and w.stat().st_size == meta.get("weights_bytes"))


# --- weights: bundle layout -> MatMulNBits layout ----------------------------------------------------------------


def unpack_int4(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """ONNX INT4 bytes (two per byte, first in the low nibble) -> uint8 nibbles [K, N] (two's complement)."""
    n = shape[0] * shape[1]
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2] = packed & 0xF
    out[1::2] = packed >> 4
    return out[:n].reshape(shape)


def to_matmulnbits(packed: np.ndarray, scales: np.ndarray, k: int, n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Bundle int4 qweight [K, N] + fp16 scales [K / block, N] -> MatMulNBits B [N, K / block, block / 2]
    uint8 and float32 scales [N, K / block]. Signed q becomes unsigned q + 8 (MatMulNBits' default zero
    point for 4 bits is 8), so (u - 8) * scale == q * scale exactly."""
    if k % block or block % 2:
        raise BundleError(f"a {k}x{n} int4 weight with group size {block} cannot be repacked for MatMulNBits")
    u = (unpack_int4(packed, (k, n)) ^ 8).T  # [N, K], unsigned
    b = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(b).reshape(n, k // block, block // 2), np.ascontiguousarray(scales.astype(np.float32).T)


def _has_qkv_bias(manifest: dict) -> bool:
    return "model.layers.0.self_attn.q_proj.bias" in manifest["weights"]["tensors"]


class _Sidecar:
    """Writes aligned tensors into the sidecar weights file and records where each one is."""

    def __init__(self, f):
        self.f, self.tensors = f, {}

    def add(self, name: str, array: np.ndarray) -> None:
        pos = self.f.tell()
        pad = (-pos) % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            pos += pad
        data = np.ascontiguousarray(array)
        self.f.write(data.tobytes())
        self.tensors[name] = {"file": WEIGHTS_NAME, "offset": pos, "nbytes": data.nbytes, "shape": list(data.shape),
                              "dtype": str(data.dtype)}


def _build_weights(bundle: Path, manifest: dict, d: Path, bundle_hash: str, max_positions: int) -> None:
    s = Shape.from_manifest(manifest)
    w = manifest["weights"]
    src = bundle / w["file"]
    mm = np.memmap(src, np.uint8, mode="r")
    group = int(manifest["quantization"]["group_size"])
    meta_t = w["tensors"]

    def raw(name):
        t = meta_t[name]
        if t["offset"] + t["nbytes"] > mm.size:
            raise BundleError(f"{src.name} is shorter than the manifest says ({name} ends at byte {t['offset'] + t['nbytes']})",
                              hint="the bundle is truncated: copy it again and run `edge-sdk verify`")
        return mm[t["offset"]: t["offset"] + t["nbytes"]]

    def fp16(name):
        return raw(name).view(np.float16).reshape(meta_t[name]["shape"])

    def linear(module):
        k, n = meta_t[f"{module}.qweight"]["shape"]
        return to_matmulnbits(raw(f"{module}.qweight"), fp16(f"{module}.scales"), k, n, group)

    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.partial-", dir=d.parent))
    try:
        with open(tmp / WEIGHTS_NAME, "wb") as f:
            out = _Sidecar(f)
            inv_freq, scaling = rope_from_graph(bundle / manifest["graphs"]["fp32"]["file"])
            pos = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
            out.add("rope.cos", (np.cos(pos) * np.float32(scaling)).astype(np.float32))
            out.add("rope.sin", (np.sin(pos) * np.float32(scaling)).astype(np.float32))
            for i in range(s.layers):
                p = f"model.layers.{i}"
                parts = [linear(f"{p}.self_attn.{x}") for x in ATTN]
                out.add(f"{p}.qkv.B", np.concatenate([b for b, _ in parts]))
                out.add(f"{p}.qkv.scales", np.concatenate([sc for _, sc in parts]))
                if _has_qkv_bias(manifest):
                    out.add(f"{p}.qkv.bias", np.concatenate([fp16(f"{p}.self_attn.{x}.bias") for x in ATTN]).astype(np.float32))
                for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                    b, sc = linear(f"{p}.{m}")
                    out.add(f"{p}.{m}.B", b)
                    out.add(f"{p}.{m}.scales", sc)
                for norm in ("input_layernorm", "post_attention_layernorm"):
                    out.add(f"{p}.{norm}", fp16(f"{p}.{norm}.weight").astype(np.float32))
            out.add("model.norm", fp16("model.norm.weight").astype(np.float32))
            if "lm_head.qweight" in meta_t:
                b, sc = linear("lm_head")
                out.add("lm_head.B", b)
                out.add("lm_head.scales", sc)
            else:  # fp16 head, stored [in, out]; tied to the embeddings ([vocab, hidden]) when absent
                head = fp16("lm_head.weight") if "lm_head.weight" in meta_t else fp16("model.embed_tokens.weight").T
                out.add("lm_head.fp16", head)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        tensors = out.tensors
        meta = {"bundle_hash": bundle_hash, "builder_version": BUILDER_VERSION, "max_positions": max_positions,
                "weights_bytes": size, "tensors": tensors}
        with open(tmp / METADATA, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if d.exists():
            shutil.rmtree(d)
        os.rename(tmp, d)
        fsync_path(d.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rope_from_graph(graph_path: Path) -> tuple[np.ndarray, float]:
    """inv_freq and attention scaling as the bundle's graph computes rotary angles:
    Cast(position_ids) -> Unsqueeze -> Mul(inv_freq) -> Concat -> Cos -> [Mul(scaling)]."""
    onnx = require("onnx", "runtime")
    from onnx import numpy_helper

    g = onnx.load(str(graph_path), load_external_data=False).graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer if i.data_location != onnx.TensorProto.EXTERNAL}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def follow(name, op):
        return next((n for n in users.get(name, []) if n.op_type == op), None)

    cast = follow("position_ids", "Cast")
    unsq = cast and follow(cast.output[0], "Unsqueeze")
    mul = unsq and follow(unsq.output[0], "Mul")
    if mul is None:
        raise BundleError(f"{graph_path.name}: the rotary embedding pattern was not found",
                          hint="load with graph='standard' to run the bundle's own graph")
    inv_freq = next(consts[i] for i in mul.input if i in consts).astype(np.float32).reshape(-1)
    concat = follow(mul.output[0], "Concat")
    cos = concat and follow(concat.output[0], "Cos")
    scale = cos and follow(cos.output[0], "Mul")
    scaling = float(next(consts[i] for i in scale.input if i in consts).reshape(-1)[0]) if scale is not None and any(i in consts for i in scale.input) else 1.0
    return inv_freq, scaling


# --- graph ---------------------------------------------------------------------------------------------------------


def build_graph(s: Shape, tensors: dict, accuracy_level: int, *, qkv_bias: bool):
    onnx = require("onnx", "runtime")
    from onnx import TensorProto, helper

    nodes, inits = [], []
    ms = "com.microsoft"
    dtypes = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}

    def init(name: str, tensor_key: str | None = None) -> str:
        t = tensors[tensor_key or name]
        p = TensorProto(name=name, data_type=dtypes[t["dtype"]], dims=t["shape"])
        p.data_location = TensorProto.EXTERNAL
        for k, v in (("location", t["file"]), ("offset", str(t["offset"])), ("length", str(t["nbytes"]))):
            e = p.external_data.add()
            e.key, e.value = k, v
        inits.append(p)
        return name

    def const(name: str, value) -> str:
        inits.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, outputs, name, domain="", **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def matmul(x, prefix, k, n, name, bias=None):
        b = init(f"{prefix}.B")
        sc = init(f"{prefix}.scales")
        block = tensors[f"{prefix}.B"]["shape"][2] * 2
        ins = [x, b, sc] + (["", "", bias] if bias else [])
        return node("MatMulNBits", ins, [f"{name}/out"], name, ms, K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level)

    h, kv, q = s.hidden, s.kv_heads * s.head_dim, s.heads * s.head_dim
    # shared per-step inputs of every attention node, computed once from attention_mask
    node("Shape", ["attention_mask"], ["/total64"], "/mask/Shape", start=1, end=2)
    node("Cast", ["/total64"], ["/total32"], "/mask/Cast", to=TensorProto.INT32)
    node("Squeeze", ["/total32"], ["/total_len"], "/mask/Squeeze")
    node("Shape", ["inputs_embeds"], ["/batch64"], "/embeds/Shape", start=0, end=1)
    node("Sub", ["/total32", const("/one32", np.array([1], np.int32))], ["/last32"], "/mask/Sub")
    node("Expand", ["/last32", "/batch64"], ["/seqlens_k"], "/mask/Expand")
    node("Cast", ["attention_mask"], ["/mask_bool"], "/mask/CastBool", to=TensorProto.BOOL)
    node("Where", ["/mask_bool", const("/zero", np.array(0.0, np.float32)), const("/min", np.array(MASK_MIN, np.float32))],
         ["/mask_add"], "/mask/Where")
    node("Unsqueeze", ["/mask_add", const("/axes12", np.array([1, 2], np.int64))], ["/mask_b11t"], "/mask/Unsqueeze")
    node("Shape", ["inputs_embeds"], ["/seq64"], "/embeds/ShapeSeq", start=1, end=2)
    node("Concat", ["/batch64", const("/one64", np.array([1], np.int64)), "/seq64", "/total64"], ["/bias_shape"], "/mask/Concat", axis=0)
    node("Expand", ["/mask_b11t", "/bias_shape"], ["/attn_bias"], "/mask/ExpandBias")

    const("/qkv_split", np.array([q, kv, kv], np.int64))
    residual, pending = "inputs_embeds", None
    cos, sin = init("rope.cos"), init("rope.sin")
    for i in range(s.layers):
        p, n_ = f"model.layers.{i}", f"/model/layers.{i}"
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
        attn = node("GroupQueryAttention",
                    [qs, ks, vs, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "/seqlens_k", "/total_len", "", "",
                     "", "/attn_bias"],
                    [f"{n_}/attn/out", f"present.{i}.key", f"present.{i}.value"], f"{n_}/attn/GroupQueryAttention", ms,
                    num_heads=s.heads, kv_num_heads=s.kv_heads, scale=float(s.head_dim ** -0.5))[0]
        o = matmul(attn, f"{p}.self_attn.o_proj", q, h, f"{n_}/attn/o_proj/MatMulNBits")
        normed, _, _, residual = node("SkipSimplifiedLayerNormalization", [o, residual, init(f"{p}.post_attention_layernorm")],
                                      [f"{n_}/post_attn_norm/out", "", "", f"{n_}/post_attn_norm/sum"], f"{n_}/post_attn_norm", ms, epsilon=s.eps)
        gate = matmul(normed, f"{p}.mlp.gate_proj", h, s.intermediate, f"{n_}/mlp/gate_proj/MatMulNBits")
        up = matmul(normed, f"{p}.mlp.up_proj", h, s.intermediate, f"{n_}/mlp/up_proj/MatMulNBits")
        sig = node("Sigmoid", [gate], [f"{n_}/mlp/Sigmoid/out"], f"{n_}/mlp/Sigmoid")
        act = node("Mul", [gate, sig], [f"{n_}/mlp/silu/out"], f"{n_}/mlp/silu")
        act = node("Mul", [act, up], [f"{n_}/mlp/gated/out"], f"{n_}/mlp/gated")
        pending = matmul(act, f"{p}.mlp.down_proj", s.intermediate, h, f"{n_}/mlp/down_proj/MatMulNBits")
    final = node("SkipSimplifiedLayerNormalization", [pending, residual, init("model.norm")], ["/model/norm/out"], "/model/norm", ms, epsilon=s.eps)
    if "lm_head.B" in tensors:
        logits = matmul(final, "lm_head", h, s.vocab, "/lm_head/MatMulNBits")
    else:
        w = node("Cast", [init("lm_head.fp16")], ["/lm_head/weight"], "/lm_head/Cast", to=TensorProto.FLOAT)
        logits = node("MatMul", [final, w], ["/lm_head/out"], "/lm_head/MatMul")
    node("Identity", [logits], ["logits"], "/logits")

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv_in = [helper.make_tensor_value_info(f"past_key_values.{i}.{k}", f32, ["batch", s.kv_heads, "past_seq", s.head_dim])
             for i in range(s.layers) for k in ("key", "value")]
    kv_out = [helper.make_tensor_value_info(f"present.{i}.{k}", f32, ["batch", s.kv_heads, "total_seq", s.head_dim])
              for i in range(s.layers) for k in ("key", "value")]
    graph = helper.make_graph(
        nodes, "edge-sdk-decoder-fused",
        [helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", s.hidden]),
         helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_seq"]),
         helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]), *kv_in],
        [helper.make_tensor_value_info("logits", f32, ["batch", "seq", s.vocab]), *kv_out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ms, 1)],
                              producer_name="edge-sdk")
    model.ir_version = 10
    return model


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
