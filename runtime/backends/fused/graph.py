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

import hashlib
import json
import logging
import os
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.errors import BundleError, require
from edge_sdk.bundle import sha256_file, staged_directory

from ..engine_cache import write_atomic

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


def key(bundle_hash: str, ort_version: str) -> str:
    return hashlib.sha256(f"{bundle_hash}:{ort_version}:{BUILDER_VERSION}".encode()).hexdigest()[:16]


class EmbeddingRows:
    """Rows of the bundle's fp16 embedding table, read on demand (a few KB per token) with pread: the
    table is never held, and a weights file cut short gives a BundleError, not a crash."""

    def __init__(self, bundle: Path, manifest: dict):
        w = manifest["weights"]
        t = w["tensors"].get(EMBED)
        if t is None or t["dtype"] not in ("float16", "float32"):
            raise BundleError(f"{bundle}: no float16/float32 {EMBED} in the weights table", hint="re-convert the model")
        self.path = Path(bundle) / w["file"]
        self.offset, self.nbytes = int(t["offset"]), int(t["nbytes"])
        self.vocab, self.hidden = (int(x) for x in t["shape"])
        self.dtype = np.dtype(t["dtype"])
        self.row = self.hidden * self.dtype.itemsize
        # rows are read on every token: through the descriptor verification hashed, never by name
        verified = getattr(manifest, "fd", None)
        self.fd = os.dup(verified(w["file"])) if verified else os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        weakref.finalize(self, os.close, self.fd)
        if os.fstat(self.fd).st_size < self.offset + self.nbytes:
            raise self._truncated()

    def _truncated(self) -> BundleError:
        return BundleError(f"{self.path} is truncated: the embedding table ends at byte {self.offset + self.nbytes:,}",
                           hint="copy the bundle again and check it with `edge-sdk verify`")

    def __call__(self, ids: np.ndarray, dtype=np.float32) -> np.ndarray:
        """int64 [B, S] -> [B, S, hidden] in `dtype` (what the graph computes in)."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            from edge_sdk.errors import RuntimeBackendError

            raise RuntimeBackendError(f"token id out of range [0, {self.vocab})")
        uniq, inv = np.unique(ids, return_inverse=True)
        rows = np.empty((len(uniq), self.hidden), self.dtype)
        for k, t in enumerate(uniq):
            data = os.pread(self.fd, self.row, self.offset + int(t) * self.row)
            if len(data) != self.row:
                raise self._truncated()
            rows[k] = np.frombuffer(data, self.dtype)
        return rows.astype(dtype)[inv.reshape(ids.shape)]


@dataclass
class FusedGraph:
    """A built fused graph as a backend uses it: the graph file (its sidecar beside it), the positions
    its rotary tables cover, and the embedding rows it is fed."""

    path: Path
    positions: int
    embedding: EmbeddingRows

    @property
    def sidecar_dir(self) -> Path:
        return self.path.parent

    def metadata(self) -> dict:
        """The sidecar's fused.json: where every tensor is, the file's size, what it was built from."""
        return json.loads((self.sidecar_dir / METADATA).read_text())

    def loaded_bytes(self) -> int:
        """What loading it takes in: the graph and the sidecar weights (embedding rows are read per step)."""
        return self.path.stat().st_size + (self.sidecar_dir / WEIGHTS_NAME).stat().st_size

    def read_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: the sidecar's tensors (rotary tables excepted) and one
        embedding row."""
        return sum(t["nbytes"] for n, t in self.metadata()["tensors"].items() if not n.startswith("rope.")) + self.embedding.row


def ensure(bundle: Path, manifest: dict, bundle_hash: str, cache_root: Path, accuracy_level: int, max_positions: int) -> Path:
    """Path of the fused graph for this bundle and accuracy level, built into the cache when missing."""
    import fcntl

    ort = require("onnxruntime", "runtime")
    root = Path(cache_root) / "ort-fused"
    d = root / key(bundle_hash, ort.__version__)
    meta = d / METADATA
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as lock:
        # one builder at a time (a daemon and a CLI loading the same bundle): the second one waits and
        # finds the entry built
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _valid(d, bundle_hash, max_positions):
            log.info("building the fused CPU graph for %s (once per bundle and onnxruntime version) in %s", Path(bundle).name, d)
            _build_weights(Path(bundle), manifest, d, bundle_hash, max_positions)
            prune(Path(cache_root), Path(bundle), keep=d)
        graph = d / GRAPH_NAME.format(level=accuracy_level)
        if not _graph_valid(graph, bundle_hash):
            model = build_graph(Shape.from_manifest(manifest), json.loads(meta.read_text())["tensors"], accuracy_level,
                                qkv_bias=_has_qkv_bias(manifest))
            data = model.SerializeToString(deterministic=True)
            write_atomic(graph, data)
            write_atomic(_graph_hash_path(graph), json.dumps({"bundle_hash": bundle_hash, "sha256": hashlib.sha256(data).hexdigest()}).encode())
    return graph


def _graph_hash_path(graph: Path) -> Path:
    return graph.with_name(graph.name + ".sha256")


def _graph_valid(graph: Path, bundle_hash: str) -> bool:
    """The cached graph exists and its bytes hash to what was recorded for this bundle when it was written."""
    try:
        rec = json.loads(_graph_hash_path(graph).read_text())
        ok = graph.is_file() and rec.get("bundle_hash") == bundle_hash
    except (OSError, ValueError, AttributeError):
        return False
    if ok and sha256_file(graph) != rec.get("sha256"):
        log.warning("fused graph cache %s fails its sha256 check: rebuilding it", graph)
        return False
    return ok


def progress(it, **kw):
    """A progress bar on a terminal (tqdm, part of edge-sdk[runtime]); the plain iterable elsewhere."""
    import sys

    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, disable=not sys.stderr.isatty(), leave=False, **kw)


def prune(cache_root: Path, bundle: Path, keep: Path) -> list[Path]:
    """Remove fused entries built earlier for the same bundle directory (another version of it)."""
    removed = []
    here = str(Path(bundle).absolute())
    for meta in (Path(cache_root) / "ort-fused").glob(f"*/{METADATA}"):
        if meta.parent == keep:
            continue
        try:
            same = json.loads(meta.read_text()).get("bundle_path") == here
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            shutil.rmtree(meta.parent, ignore_errors=True)
            removed.append(meta.parent)
    return removed


def _valid(d: Path, bundle_hash: str, max_positions: int) -> bool:
    try:
        meta = json.loads((d / METADATA).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    w = d / WEIGHTS_NAME
    if not (isinstance(meta, dict) and meta.get("bundle_hash") == bundle_hash and meta.get("builder_version") == BUILDER_VERSION
            and meta.get("max_positions", 0) >= max_positions and w.is_file() and not w.is_symlink()
            and w.stat().st_size == meta.get("weights_bytes") and meta.get("weights_sha256")):
        return False
    if sha256_file(w) != meta["weights_sha256"]:  # bound to the bundle through bundle_hash above
        log.warning("fused graph cache %s fails its sha256 check: rebuilding it", w)
        return False
    return True


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


def _verified_map(manifest: dict, rel: str, path: Path) -> np.ndarray:
    """The bundle's weights as read-only bytes, mapped from the descriptor verification hashed."""
    import mmap

    verified = getattr(manifest, "fd", None)
    if verified is None:
        return np.memmap(path, np.uint8, mode="r")
    fd = verified(rel)
    if os.fstat(fd).st_size == 0:
        return np.zeros(0, np.uint8)
    return np.frombuffer(mmap.mmap(fd, 0, prot=mmap.PROT_READ), np.uint8)


def _build_weights(bundle: Path, manifest: dict, d: Path, bundle_hash: str, max_positions: int) -> None:
    s = Shape.from_manifest(manifest)
    w = manifest["weights"]
    src = bundle / w["file"]
    mm = _verified_map(manifest, w["file"], src)
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

    with staged_directory(d, overwrite=True) as tmp:  # fsynced and renamed into place; a crash leaves a .partial
        with open(tmp / WEIGHTS_NAME, "wb") as f:
            out = _Sidecar(f)
            inv_freq, scaling = rope_from_graph(bundle / manifest["graphs"]["fp32"]["file"])
            cos, sin = rope_rows(np.arange(max_positions), inv_freq, scaling)
            out.add("rope.cos", cos)
            out.add("rope.sin", sin)
            for i in progress(range(s.layers), desc="fused graph", unit="layer"):
                p = f"model.layers.{i}"
                parts = [linear(f"{p}.self_attn.{x}") for x in ATTN]
                out.add(f"{p}.qkv.B", np.concatenate([b for b, _ in parts]))
                out.add(f"{p}.qkv.scales", np.concatenate([sc for _, sc in parts]))
                if _has_qkv_bias(manifest):
                    out.add(f"{p}.qkv.bias", np.concatenate([fp16(f"{p}.self_attn.{x}.bias") for x in ATTN]).astype(np.float32))
                # gate and up packed like q/k/v: one MatMulNBits with N = 2 x intermediate streams faster
                # than two (benchmarks/bench_int4_kernel.py --inner 17920 against 8960)
                parts = [linear(f"{p}.mlp.{x}") for x in ("gate_proj", "up_proj")]
                out.add(f"{p}.mlp.gate_up.B", np.concatenate([b for b, _ in parts]))
                out.add(f"{p}.mlp.gate_up.scales", np.concatenate([sc for _, sc in parts]))
                for m in ("self_attn.o_proj", "mlp.down_proj"):
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
                head = fp16("lm_head.weight") if "lm_head.weight" in meta_t else fp16(EMBED).T
                out.add("lm_head.fp16", head)
            size = f.tell()
        meta = {"bundle_hash": bundle_hash, "bundle_path": str(bundle.absolute()), "builder_version": BUILDER_VERSION,
                "max_positions": max_positions, "weights_bytes": size, "weights_sha256": sha256_file(tmp / WEIGHTS_NAME),
                "tensors": out.tensors}
        (tmp / METADATA).write_text(json.dumps(meta, indent=1, sort_keys=True))


def rope_rows(positions: np.ndarray, inv_freq: np.ndarray, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin rows [len(positions), head_dim / 2] of the rotary tables (float32, as the tables are built)."""
    angle = np.asarray(positions, np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    return (np.cos(angle) * np.float32(scaling)).astype(np.float32), (np.sin(angle) * np.float32(scaling)).astype(np.float32)


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
