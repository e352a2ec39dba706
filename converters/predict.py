"""--dry-run: convert the first decoder layer, measure it, predict the whole conversion.

Every stage after loading works one decoder layer at a time, so the whole run costs about
load + layers x (quantize + export + evaluate one layer), and its peak memory is the peak of one
layer's work. The layer quantized here stays in the work directory: the real run continues from it.

Reading the checkpoint is predicted apart from the compute: the measured layer is read once before it
is timed (so its compute is timed with its bytes in the page cache, whatever the cache held before),
and every layer's read costs READS_PER_LAYER x its bytes / the read speed of a sample of the largest
shard taken with the page cache bypassed (posix_fadvise DONTNEED drops the sample's pages first).
"""

from __future__ import annotations

import os
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


def read_seconds(layer_bytes: int, bytes_per_s: float | None, reads: int = READS_PER_LAYER) -> float:
    """Seconds one layer spends reading the checkpoint, at the cold read speed."""
    return reads * layer_bytes / bytes_per_s if bytes_per_s else 0.0


def predicted_seconds(load_s, layers, per_layer_s, read_s, once_s) -> float:
    return load_s + layers * (per_layer_s + read_s) + once_s


def eval_windows(eval_tokens: int, window: int = 512) -> int:
    """How many windows streamed_eval.nll cuts `eval_tokens` held-out tokens into."""
    return sum(1 for s in range(0, eval_tokens - 1, window - 1) if min(window, eval_tokens - s) >= 2)


def _accuracy_costs(ck, shape, src, work, opts, i, lm_q) -> tuple[tuple[float, float], float]:
    """((build layer i for both models, one window through it), one window's heads), in seconds."""
    from .decoder import rope_tables
    from .streamed_eval import StreamedModel

    inv_freq, scale = rope_tables(ck.config, ck.arch)
    ids = torch.zeros(1, min(512, opts.eval_tokens + 1), dtype=torch.long)
    build = fwd = head = 0.0
    for kind in ("quant", "float"):
        m = StreamedModel(kind, src, work, shape, ck.arch, opts, inv_freq, scale, lm_q if kind == "quant" else None)
        c, s, mask, e = m.window_inputs(ids)
        x = m.embed(ids)
        with torch.no_grad():
            t0 = time.perf_counter()
            layer = m.layer(i)
            t1 = time.perf_counter()
            x = layer(x, c, s, mask, e, e)[0]
            t2 = time.perf_counter()
            m.head(x)
            t3 = time.perf_counter()
        build, fwd, head = build + t1 - t0, fwd + t2 - t1, head + t3 - t2
        del layer
    return (build, fwd), head


def dry_run(ck, shape, output, opts, stages, *, calib) -> dict:
    from .streamed_convert import gpu_memory_errors, peak_rss, resolve_device

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
    with stages("export"):
        t = time.perf_counter()
        w = StreamWriter(work_path / ".dry-run.weights")
        from .layerwise import from_result

        for n, ql in from_result(work.load("layer", i), opts.group_size).items():
            _add_quant(w, n, ql)
        w.close()
        (work_path / ".dry-run.weights").unlink()
        export_s = time.perf_counter() - t
        t = time.perf_counter()  # the ends as the export writes them (bytes discarded): their time and memory
        lm_q = lm_head_rtn(src, ck.arch, shape, opts.group_size) if opts.lm_head_dtype == "int4" else None
        for _ in (*_half_chunks(src, ck.arch.embed, (shape.vocab_size, shape.hidden_size)),
                  *(pack_int4_chunks(lm_q.q.t()) if lm_q is not None else ())):
            pass
        ends_s = time.perf_counter() - t
    with stages("accuracy"):
        layer_s, head_s = _accuracy_costs(ck, shape, src, work, opts, i, lm_q)
    n, windows = shape.num_layers, eval_windows(opts.eval_tokens)
    load_s = stages.seconds.get("load", 0.0)
    eval_s = layer_s[0] + windows * layer_s[1]
    read_s = read_seconds(layer_bytes, speed)
    predicted = {
        "peak_rss_bytes": peak_rss(),
        "seconds": round(predicted_seconds(load_s, n, quant_s + export_s + eval_s, read_s, ends_s + windows * head_s), 3),
        "seconds_per_layer": {"quantize": round(quant_s, 3), "export": round(export_s, 3), "accuracy": round(eval_s, 3),
                              "read_checkpoint": round(read_s, 6)},
        "checkpoint_read_bytes_per_second": round(speed) if speed else None,
        "seconds_once": {"export_embedding_lm_head": round(ends_s, 3), "accuracy_heads": round(windows * head_s, 3)},
        "bundle_weight_bytes": weights_file_bytes(shape, ck.arch, opts),
        "work_dir_bytes": work_dir_bytes(shape, opts),
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    predicted["disk_bytes"] = predicted["bundle_weight_bytes"] + predicted["work_dir_bytes"]
    return {"dry_run": True, "source": str(ck.path), "output": str(output), "work_dir": str(work_path), "device": str(device),
            "layers": n, "measured_layer": i, "predicted": predicted, "seconds": stages.seconds, "peak_rss_bytes": peak_rss()}
