"""The fused graph's sidecar weights file: the bundle's int4 weights repacked into MatMulNBits' layout, fp32
scales and norms, rotary tables, every tensor page aligned; and the embedding rows read per step."""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import numpy as np

from edge_sdk.errors import BundleError, require
from edge_sdk.bundle import sha256_file, staged_directory

from .graph import ALIGN, ATTN, BUILDER_VERSION, EMBED, METADATA, WEIGHTS_NAME, Shape


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


def progress(it, **kw):
    """A progress bar on a terminal (tqdm, part of edge-sdk[runtime]); no bar elsewhere."""
    import sys

    from tqdm import tqdm

    return tqdm(it, disable=not sys.stderr.isatty(), leave=False, **kw)




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


def has_qkv_bias(manifest: dict) -> bool:
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


def build_weights(bundle: Path, manifest: dict, d: Path, bundle_hash: str, max_positions: int) -> None:
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
                if has_qkv_bias(manifest):
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
