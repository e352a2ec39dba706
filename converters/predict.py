"""--dry-run: convert the first decoder layer, measure it, predict the whole conversion.

Every stage after loading works one decoder layer at a time, so the whole run costs about
load + layers x (quantize + export + evaluate one layer), and its peak memory is the peak of one
layer's work. The layer quantized here stays in the work directory: the real run continues from it.

Reading the checkpoint is predicted apart from the compute: the measured layer is read once before it
is timed (so its compute is timed with its bytes in the page cache, whatever the cache held before),
and every layer's read costs READS_PER_LAYER x its bytes / the read speed of a sample of the largest
shard taken with the page cache bypassed (posix_fadvise DONTNEED drops the sample's pages first).

What the layer cannot show is measured by small probes: the disk's write speed (a sample written and
fsynced, then removed: the export fsyncs model.weights), sha256's speed (the package stage hashes
every file), the graph trace at the full layer count, and onnxruntime opening one decoder layer's
int4 weights (the verify stage opens a piece per layer twice).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch

from .archs import ATTN, MLP
from .layerwise import check_groups, in_features
from .quant import pack_int4_chunks
from .streaming import Layers, StreamWriter, _add_quant, _half_chunks, lm_head_rtn, work_identity
from .tensors import TensorSource, expected_shapes
from .weights_file import ALIGNMENT
from .workdir import WorkDir, default_work_dir


def weights_file_bytes(shape, arch, opts) -> int:
    """Size of model.weights, computed with the writer's alignment rule."""
    sizes = [shape.vocab_size * shape.hidden_size * 2]
    g = opts.group_size
    for i in range(shape.num_layers):
        exp = expected_shapes(shape, arch, i)
        for n, s in exp.items():
            if n.endswith(".weight") and n.rsplit(".", 2)[-2] in (*ATTN, *MLP):
                out, inp = s
                sizes += [-(-out * inp // 2), inp // g * out * 2]
            else:
                sizes.append(2 * s[0])
    sizes.append(shape.hidden_size * 2)
    v, h = shape.vocab_size, shape.hidden_size
    sizes += [v * h // 2, h // g * v * 2] if opts.lm_head_dtype == "int4" else [v * h * 2]
    off = 0
    for n in sizes:
        off = -(-off // ALIGNMENT) * ALIGNMENT + n
    return off


def work_dir_bytes(shape, opts) -> int:
    per_layer = sum((shape.hidden_size if p not in ("o_proj", "down_proj") else in_features(shape, p))
                    * _out(shape, p) * (1 + 2 / opts.group_size) for p in (*ATTN, *MLP))
    acts = 2 * opts.nsamples * opts.seqlen * shape.hidden_size * 4 if opts.method == "gptq" else 0
    return int(shape.num_layers * per_layer + acts)


def _out(shape, p) -> int:
    return {"q_proj": shape.num_heads * shape.head_dim, "k_proj": shape.num_kv_heads * shape.head_dim,
            "v_proj": shape.num_kv_heads * shape.head_dim, "o_proj": shape.hidden_size,
            "down_proj": shape.hidden_size}.get(p, shape.intermediate_size)


READ_SAMPLE_BYTES = 256 << 20
READS_PER_LAYER = 2  # quantize reads the layer; the accuracy stage reads it again for the float model


def cold_read_speed(path: Path, sample: int = READ_SAMPLE_BYTES, clock=time.perf_counter) -> float | None:
    """Bytes per second reading the last `sample` bytes of `path` after dropping them from the page
    cache; None where the OS offers no posix_fadvise (the read time is then left out)."""
    if not hasattr(os, "posix_fadvise"):
        return None
    size = Path(path).stat().st_size
    n, got = min(sample, size), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, size - n, n, os.POSIX_FADV_DONTNEED)
        t = clock()
        while got < n:
            b = os.pread(fd, min(n - got, 16 << 20), size - n + got)
            if not b:
                break
            got += len(b)
        dt = clock() - t
        os.posix_fadvise(fd, size - n, n, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return got / dt if got and dt > 0 else None


def warm_layer(src, shape, arch, i: int) -> int:
    """Read layer i's tensors one at a time (into the page cache); -> their bytes in the checkpoint."""
    total = 0
    for name, shp in expected_shapes(shape, arch, i).items():
        t = src.get(name, shp)
        total += t.numel() * t.element_size()
        del t
    return total


def read_seconds(layer_bytes: int, bytes_per_s: float | None, reads: int = 1) -> float:
    """Seconds one layer spends reading the checkpoint, at the cold read speed."""
    return reads * layer_bytes / bytes_per_s if bytes_per_s else 0.0


WRITE_SAMPLE_BYTES = 256 << 20
HASH_SAMPLE_BYTES = 64 << 20


def write_speed(directory: Path, sample: int = WRITE_SAMPLE_BYTES, clock=time.perf_counter) -> float | None:
    """Bytes per second writing `sample` bytes to a new file in `directory` and fsyncing it (the file
    is removed): how fast model.weights reaches the disk."""
    block = os.urandom(1 << 20)
    fd, name = tempfile.mkstemp(prefix=".write-speed-", dir=directory)
    try:
        t, left = clock(), sample
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
        dt = clock() - t
    finally:
        os.close(fd)
        os.unlink(name)
    return sample / dt if dt > 0 else None


def hash_speed(sample: int = HASH_SAMPLE_BYTES, clock=time.perf_counter) -> float | None:
    """Bytes per second of sha256 over `sample` bytes in memory (the package stage hashes every file)."""
    data = os.urandom(sample)
    t = clock()
    hashlib.sha256(data).digest()
    dt = clock() - t
    return sample / dt if dt > 0 else None


def stage_seconds(n: int, c: dict, weight_bytes: int, verify: bool) -> dict[str, float]:
    """Predicted seconds per stage of the real run, from the measured costs `c` (seconds; speeds in
    bytes/s, None where unmeasured): per layer (quantize, read, export, verify_layer, accuracy) or once
    (load, ends, graph, heads, verify_once)."""
    def per(nbytes, speed):
        return nbytes / speed if speed else 0.0

    out = {"load": c["load"],
           "quantize": n * (c["quantize"] + c["read"]),
           "export": n * c["export"] + c["ends"] + c["graph"] + per(weight_bytes, c["write_speed"]),
           "accuracy": n * (c["accuracy"] + c["read"]) + c["heads"],
           "package": per(weight_bytes, c["hash_speed"])}
    if verify:
        out["verify"] = n * c["verify_layer"] + c["verify_once"]
    return out


def eval_windows(eval_tokens: int, window: int = 512) -> int:
    """How many windows streamed_eval.nll cuts `eval_tokens` held-out tokens into."""
    return sum(1 for s in range(0, eval_tokens - 1, window - 1) if min(window, eval_tokens - s) >= 2)


def _eval_costs(ck, shape, src, work, opts, i, lm_q, eval_tokens: int) -> dict:
    """Seconds per kind: build layer i, one window through it, one window's head; and the quant layer
    on the verify stage's input (2 x 16 tokens)."""
    from .decoder import rope_tables
    from .streamed_eval import StreamedModel

    inv_freq, scale = rope_tables(ck.config, ck.arch)
    ids = torch.zeros(1, min(512, eval_tokens + 1), dtype=torch.long)  # the first window, bos included
    c = {"build": {}, "forward": {}, "head": {}}
    for kind in ("quant", "float"):
        m = StreamedModel(kind, src, work, shape, ck.arch, opts, inv_freq, scale, lm_q if kind == "quant" else None)
        cs, sn, mask, e = m.window_inputs(ids)
        x = m.embed(ids)
        with torch.no_grad():
            t0 = time.perf_counter()
            layer = m.layer(i)
            t1 = time.perf_counter()
            x = layer(x, cs, sn, mask, e, e)[0]
            t2 = time.perf_counter()
            m.head(x)
            t3 = time.perf_counter()
            if kind == "quant":
                small = torch.zeros(2, 16, dtype=torch.long)
                cs, sn, mask, e = m.window_inputs(small)
                t4 = time.perf_counter()
                layer(m.embed(small), cs, sn, mask, e, e)
                c["verify_forward"] = time.perf_counter() - t4
        c["build"][kind], c["forward"][kind], c["head"][kind] = t1 - t0, t2 - t1, t3 - t2
        del layer
    return c


def ort_layer_seconds(weights: Path, wsec: dict, modules: list[str], group_size: int, tokens: int = 16) -> float:
    """Seconds for onnxruntime to open, and run once on `tokens` tokens, a graph of one layer's int4
    linears as the export writes them (DequantizeLinear of the int4 weight, MatMul), reading the
    weights from `weights` (a file written with StreamWriter; `wsec` its section)."""
    from onnx import TensorProto, helper

    from .accuracy import ort_session
    from .onnx_export import IR_VERSION, OPSET, _external, save

    nodes, inputs, outputs, inits, feeds = [], [], [], [], {}
    for k, m in enumerate(modules):
        inp, out = wsec["tensors"][f"{m}.qweight"]["shape"]
        q, s = f"{m}.qweight", f"{m}.scales"
        inits += [_external(q, TensorProto.INT4, wsec, weights.name), _external(s, TensorProto.FLOAT16, wsec, weights.name)]
        nodes += [helper.make_node("Cast", [s], [f"s{k}"], to=TensorProto.FLOAT),
                  helper.make_node("DequantizeLinear", [q, f"s{k}"], [f"w{k}"], axis=0, block_size=group_size),
                  helper.make_node("MatMul", [f"x{k}", f"w{k}"], [f"y{k}"])]
        inputs.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [2, tokens, inp]))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, [2, tokens, out]))
        feeds[f"x{k}"] = torch.zeros(2, tokens, inp).numpy()
    model = helper.make_model(helper.make_graph(nodes, "layer", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    path = weights.with_suffix(".onnx")
    save(model, path)
    try:
        t = time.perf_counter()
        ort_session(path).run(None, feeds)
        return time.perf_counter() - t
    finally:
        path.unlink(missing_ok=True)


def _graph_seconds(ck, shape) -> float:
    """The graph trace at the full layer count (the export traces the small stub once per graph)."""
    from .decoder import rope_tables, trace_stub
    from .onnx_export import trace

    inv_freq, scale = rope_tables(ck.config, ck.arch)
    t = time.perf_counter()
    trace(trace_stub(shape, ck.arch, inv_freq, scale, torch.float32), shape.num_layers)
    return time.perf_counter() - t


def dry_run(ck, shape, output, opts, stages, *, calib, eval_tokens: int | None = None) -> dict:
    """eval_tokens: how many held-out tokens there are (the evaluation uses at most --eval-tokens of them)."""
    from .streamed_convert import gpu_memory_errors, peak_rss, resolve_device

    wall0, cpu0 = time.perf_counter(), time.process_time()
    device = resolve_device(opts)
    check_groups(shape, ck.arch, opts.group_size)
    src = TensorSource(ck.path, ck.safetensors)
    work_path = Path(opts.work_dir) if opts.work_dir else default_work_dir(output)
    work = WorkDir(work_path, work_identity(ck, opts, calib))
    layers = Layers(ck, shape, src, calib, opts, work, device)
    first = work.first_missing_layer(shape.num_layers)
    i = min(first, shape.num_layers - 1)
    with stages("quantize"), gpu_memory_errors(device, opts):
        layer_bytes = warm_layer(src, shape, ck.arch, i)
        speed = cold_read_speed(max(ck.safetensors, key=lambda f: f.stat().st_size))
        t = time.perf_counter()
        layers.run(stop_after=1)
        quant_s = time.perf_counter() - t
    dry = work_path / ".dry-run.weights"
    try:
        with stages("export"):
            from .layerwise import from_result

            export_s = float("inf")
            for _ in range(2):  # the faster of two: one short stall on a shared machine costs every layer
                t = time.perf_counter()
                w = StreamWriter(dry)
                quantized = from_result(work.load("layer", i), opts.group_size)
                for name, ql in quantized.items():
                    _add_quant(w, name, ql)
                wsec = w.close()
                export_s = min(export_s, time.perf_counter() - t)
            t = time.perf_counter()  # the ends as the export writes them (bytes discarded): their time and memory
            lm_q = lm_head_rtn(src, ck.arch, shape, opts.group_size) if opts.lm_head_dtype == "int4" else None
            for _ in (*_half_chunks(src, ck.arch.embed, (shape.vocab_size, shape.hidden_size)),
                      *(pack_int4_chunks(lm_q.q.t()) if lm_q is not None else ())):
                pass
            ends_s = time.perf_counter() - t
            graph_s = _graph_seconds(ck, shape) * len(opts.graphs)
            out_dir = Path(output).absolute().parent
            wspeed = write_speed(out_dir if out_dir.is_dir() else work_path)
        if opts.verify:
            with stages("verify"):
                ort_s = ort_layer_seconds(dry, wsec, list(quantized), opts.group_size)
    finally:
        dry.unlink(missing_ok=True)
    with stages("accuracy"):
        n_eval = opts.eval_tokens if eval_tokens is None else min(opts.eval_tokens, eval_tokens)
        ev = _eval_costs(ck, shape, src, work, opts, i, lm_q, n_eval)
    n, windows = shape.num_layers, eval_windows(n_eval)
    costs = {"load": stages.seconds.get("load", 0.0), "quantize": quant_s, "read": read_seconds(layer_bytes, speed),
             "export": export_s, "ends": ends_s, "graph": graph_s, "write_speed": wspeed,
             "accuracy": sum(ev["build"].values()) + windows * sum(ev["forward"].values()), "heads": windows * sum(ev["head"].values()),
             # check_layers: the int4 layer built once, then per step (16-token prefill, 1-token decode) a torch
             # forward and a piece opened and run in onnxruntime; both steps costed as the prefill
             "verify_layer": ev["build"]["quant"] + 2 * (ev["verify_forward"] + ort_s) if opts.verify else 0.0,
             "verify_once": 2 * ev["head"]["quant"],  # the tail's reference logits, prefill and decode
             "hash_speed": hash_speed()}
    wbytes = weights_file_bytes(shape, ck.arch, opts)
    by_stage = stage_seconds(n, costs, wbytes, opts.verify)
    predicted = {
        "peak_rss_bytes": peak_rss(),
        "seconds": round(sum(by_stage.values()), 3),
        "seconds_by_stage": {k: round(v, 3) for k, v in by_stage.items()},
        "seconds_per_layer": {"quantize": round(quant_s, 3), "export": round(export_s, 3), "accuracy": round(costs["accuracy"], 3),
                              "read_checkpoint": round(READS_PER_LAYER * costs["read"], 6)}
                             | ({"verify": round(costs["verify_layer"], 3)} if opts.verify else {}),
        "onnxruntime_layer_piece_seconds": round(ort_s, 3) if opts.verify else None,
        "checkpoint_read_bytes_per_second": round(speed) if speed else None,
        "weights_write_bytes_per_second": round(wspeed) if wspeed else None,
        "sha256_bytes_per_second": round(costs["hash_speed"]) if costs["hash_speed"] else None,
        "seconds_once": {"export_embedding_lm_head": round(ends_s, 3), "export_graphs": round(graph_s, 3),
                         "accuracy_heads": round(costs["heads"], 3)}
                        | ({"verify_tail": round(costs["verify_once"], 3)} if opts.verify else {}),
        "bundle_weight_bytes": wbytes,
        "work_dir_bytes": work_dir_bytes(shape, opts),
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    predicted["disk_bytes"] = predicted["bundle_weight_bytes"] + predicted["work_dir_bytes"]
    return {"dry_run": True, "source": str(ck.path), "output": str(output), "work_dir": str(work_path), "device": str(device),
            "layers": n, "measured_layer": i, "predicted": predicted, "seconds": stages.seconds, "peak_rss_bytes": peak_rss(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            # CPU seconds per wall second while measuring: lower than usual means other work slowed the measurement
            "cpu_per_wall": round((time.process_time() - cpu0) / (time.perf_counter() - wall0), 2)}
