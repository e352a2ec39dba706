"""The conversion in memory bounded by one decoder layer: quantize layer by layer into the work
directory, then write the weights file, check and evaluate by streaming layers from it.

Peak memory is one layer in fp32, the calibration activations, and row chunks of the embedding and
lm_head; never the whole model. The bytes written are those of the whole-model pipeline.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .archs import ATTN, MLP
from .layerwise import GPTQLayers, from_result, layer_result, rtn_layer
from .quant import check_group, pack_int4_chunks, rtn
from .tensors import expected_shapes
from .weights_file import ALIGNMENT, _LAYER
from .workdir import WorkDir, maybe_kill

CHUNK_BYTES = 256 * 2**20  # fp32 bytes of one embedding / lm_head row chunk


def rows_per_chunk(cols: int) -> int:
    return max(1, CHUNK_BYTES // (4 * cols))


def work_identity(ck, opts, calib) -> dict:
    return {"format": "edge-sdk-convert-work/1", "source": ck.files, "method": opts.method, "bits": opts.bits,
            "group_size": opts.group_size, "damp_percent": opts.damp_percent, "act_order": opts.act_order,
            "seed": opts.seed, "calibration": calib.sha256}


class Layers:
    """Quantize every decoder layer not yet in the work directory; report each as it finishes."""

    def __init__(self, ck, shape, src, calib, opts, work: WorkDir, device, on_layer=None):
        self.ck, self.shape, self.src, self.calib, self.opts, self.work = ck, shape, src, calib, opts, work
        self.device, self.on_layer = device, on_layer or (lambda i, s: None)
        self.layer_seconds: dict[int, float] = {}

    def run(self, stop_after: int | None = None) -> None:
        n = self.shape.num_layers
        start = self.work.first_missing_layer(n)
        for i in range(start):
            self.on_layer(i, None)
        if start == n:
            return
        last = n if stop_after is None else min(n, start + stop_after)
        if self.opts.method == "rtn":
            for i in range(start, last):
                t = time.perf_counter()
                q = rtn_layer(self.src, self.shape, self.ck.arch, i, self.opts)
                self._commit(i, q, None, t)
            return
        g = GPTQLayers(self.ck, self.shape, self.src, self.calib, self.opts, self.device)
        xs = g.embed() if start == 0 else self._acts(start - 1)
        for i in range(start, last):
            t = time.perf_counter()
            q, xs = g.layer(i, xs)
            self._commit(i, q, xs if i < n - 1 else None, t)

    def _acts(self, i: int) -> list[torch.Tensor]:
        a = self.work.load("acts", i)
        if a is None:  # inputs of the next layer lost: redo layer i from the start
            self.work.drop("layer", i)
            raise _Restart()
        return [a[str(k)].to(self.device) for k in range(len(a))]

    def _commit(self, i, q, xs, t0) -> None:
        if xs is not None:
            self.work.save("acts", i, {str(k): x.cpu() for k, x in enumerate(xs)})
        self.work.save("layer", i, layer_result(q))
        if i > 0:
            self.work.drop("acts", i - 1)
        self.layer_seconds[i] = round(time.perf_counter() - t0, 3)
        self.on_layer(i, self.layer_seconds[i])
        maybe_kill(i)


class _Restart(Exception):
    pass


def quantize_layers(layers: Layers, stop_after: int | None = None) -> None:
    for _ in range(layers.shape.num_layers + 1):
        try:
            return layers.run(stop_after)
        except _Restart:
            continue


# ---- the weights file, written tensor by tensor in the order of weights_file.write_weights ----

class StreamWriter:
    def __init__(self, path: Path):
        self.path, self.f, self.offset = path, open(path, "wb"), 0
        self.table: dict[str, dict] = {}
        self.layers: dict[int, list[int]] = {}

    def add(self, name: str, dtype: str, shape: tuple, chunks) -> None:
        self.offset = -(-self.offset // ALIGNMENT) * ALIGNMENT
        self.f.seek(self.offset)
        n = 0
        for c in chunks:
            self.f.write(c)
            n += len(c)
        self.table[name] = {"offset": self.offset, "nbytes": n, "dtype": dtype, "shape": list(shape)}
        m = _LAYER.match(name)
        if m:
            span = self.layers.setdefault(int(m.group(1)), [self.offset, self.offset])
            span[1] = self.offset + n
        self.offset += n

    def close(self) -> dict:
        self.f.truncate(self.offset)
        self.f.flush()
        self.f.close()
        return {"file": self.path.name, "alignment": ALIGNMENT, "tensors": self.table,
                "layers": [{"index": i, "offset": a, "nbytes": b - a} for i, (a, b) in sorted(self.layers.items())]}


def _half_chunks(src, name, shape, transpose=False):
    if transpose:  # lm_head as [in, out]: fp16 [hidden, vocab]
        yield src.get(name, shape).to(torch.float16).t().contiguous().numpy().tobytes()
        return
    step = rows_per_chunk(shape[-1]) if len(shape) == 2 else shape[0]
    for a in range(0, shape[0], step):
        yield src.get(name, shape, rows=slice(a, a + step)).to(torch.float16).contiguous().numpy().tobytes()


def _add_quant(w: StreamWriter, module, ql) -> None:
    q_t, s_t = ql.q.t(), ql.scales.t().contiguous()  # q_t: a view, packed in row pieces
    w.add(f"{module}.qweight", "int4", tuple(q_t.shape), pack_int4_chunks(q_t))
    w.add(f"{module}.scales", "float16", tuple(s_t.shape), [s_t.numpy().tobytes()])


def lm_head_rtn(src, arch, shape, g: int):
    """int4 lm_head by round-to-nearest, row chunk by row chunk (groups run along a row: the same
    integers as the whole matrix at once)."""
    from .quant import QuantizedLinear

    name = arch.lm_head if arch.lm_head in src else arch.embed
    v, h = shape.vocab_size, shape.hidden_size
    check_group(h, g, "lm_head")
    q, scales = torch.empty(v, h, dtype=torch.int8), torch.empty(v, h // g, dtype=torch.float16)
    step = rows_per_chunk(h)
    for a in range(0, v, step):
        ql = rtn(src.get(name, (v, h), rows=slice(a, a + step)), g)
        q[a:a + step], scales[a:a + step] = ql.q, ql.scales
    return QuantizedLinear(q, scales, g)


def write_weights_streamed(path: Path, src, work: WorkDir, shape, arch, opts, lm_head=None) -> tuple[dict, set, dict]:
    """The bundle's weights file; returns the `weights` section, the fp16 names and {linear: group}.
    lm_head: () -> the int4 lm_head (the caller's cached lm_head_rtn, so verify reuses it), default computed here."""
    w = StreamWriter(path)
    fp16: set[str] = set()
    groups: dict[str, SimpleNamespace] = {}

    def half(name, shp, transpose=False, source=None):
        fp16.add(name)
        w.add(name, "float16", tuple(reversed(shp)) if transpose else shp, _half_chunks(src, source or name, shp, transpose))

    ends = expected_shapes(shape, arch, None)
    half(arch.embed, ends[arch.embed])
    for i in range(shape.num_layers):
        q = from_result(work.load("layer", i), opts.group_size)
        exp = expected_shapes(shape, arch, i)
        half(arch.norm(i, "input_norm"), exp[arch.norm(i, "input_norm")])
        for p in ATTN:
            _add_quant(w, arch.linear(i, p), q[arch.linear(i, p)])
            groups[arch.linear(i, p)] = SimpleNamespace(group_size=opts.group_size)
            if f"{arch.linear(i, p)}.bias" in exp:
                half(f"{arch.linear(i, p)}.bias", exp[f"{arch.linear(i, p)}.bias"])
        half(arch.norm(i, "post_attn_norm"), exp[arch.norm(i, "post_attn_norm")])
        for p in MLP:
            _add_quant(w, arch.linear(i, p), q[arch.linear(i, p)])
            groups[arch.linear(i, p)] = SimpleNamespace(group_size=opts.group_size)
    half(arch.final_norm, ends[arch.final_norm])
    if opts.lm_head_dtype == "int4":
        _add_quant(w, "lm_head", lm_head() if lm_head else lm_head_rtn(src, arch, shape, opts.group_size))
        groups["lm_head"] = SimpleNamespace(group_size=opts.group_size)
    elif arch.lm_head in src:
        half(arch.lm_head, ends[arch.lm_head], transpose=True)
    elif shape.tie_word_embeddings:  # an fp16 head tied to the embeddings: the table, stored as [in, out]
        half(arch.lm_head, ends[arch.lm_head], transpose=True, source=arch.embed)
    return w.close(), fp16, groups


def gptq_engine() -> str:
    import gptqmodel as gm

    return f"gptqmodel {gm.__version__ if hasattr(gm, '__version__') else ''}".strip()


def quant_section(opts, calib) -> dict:
    section = {
        "method": "gptq", "bits": opts.bits, "group_size": opts.group_size, "symmetric": True,
        "act_order": opts.act_order, "damp_percent": opts.damp_percent, "seed": opts.seed,
        "calibration": {"sha256": calib.sha256, "nsamples": calib.nsamples, "seqlen": len(calib.ids[0])},
        "lm_head_method": "rtn" if opts.lm_head_dtype == "int4" else None,
        "imported": False,
    }
    return section | ({"method": "gptq", "engine": gptq_engine()} if opts.method == "gptq" else {"method": "rtn"})


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()
