"""The pipeline's stages after loading, for a float checkpoint, one decoder layer at a time.

quantize: layer by layer into the work directory (resumable) · export: weights file streamed from
the work directory, graph traced from the small stub · verify: whole-graph check for models small
enough to hold in fp32 · accuracy: streamed float and int4 models · package: manifest, signature.
"""

from __future__ import annotations

import functools

import resource
from contextlib import contextmanager
from pathlib import Path

import torch

from edge_sdk.errors import ConfigError, ConversionError
from edge_sdk.fsutil import fsync_path

from . import accuracy
from .checkpoint import TOKENIZER_FILES
from .layerwise import check_groups, from_result
from .streaming import Layers, lm_head_rtn, quant_section, quantize_layers, work_identity, write_weights_streamed
from .tensors import TensorSource, expected_shapes
from .workdir import WorkDir, default_work_dir, remove_work_dir

WHOLE_GRAPH_CHECK_PARAMS = 200_000_000  # above this the fp32 reference of the whole-graph check is not built


def resolve_device(opts) -> torch.device:
    """The first device; every one --devices lists is checked (layer i runs on devices[i % n])."""
    for d in opts.devices[1:]:
        _check_device(d)
    want = (opts.devices[0] if opts.devices else None) or opts.device or "auto"
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _check_device(want)


def _check_device(want: str) -> torch.device:
    dev = torch.device(want)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"--device {want}: no CUDA device is available here (torch {torch.__version__})",
                              hint="pass --device cpu, or install a CUDA build of torch on a machine with a GPU")
        if (dev.index or 0) >= n:
            raise ConfigError(f"--device {want}: only {n} CUDA device(s) here", hint=f"choose cuda:0 .. cuda:{n - 1}")
    return dev


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@contextmanager
def gpu_memory_errors(device, opts):
    """A GPU running out of memory is one line saying what to change; the finished layers are kept."""
    try:
        yield
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConversionError(f"{device}: out of memory during the conversion ({first})",
                              hint=f"pass --device cpu, or a smaller calibration (--nsamples {max(1, opts.nsamples // 2)} "
                                   f"or --seqlen {max(16, opts.seqlen // 2)}), and run the same command again: "
                                   "finished layers are kept") from exc


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LayerBar:
    """Layer N of M with an ETA on the pipeline's one progress bar."""

    def __init__(self, stages, n: int):
        self.stages, self.n, self.times = stages, n, []

    def __call__(self, i: int, seconds: float | None) -> None:
        if seconds is not None:
            self.times.append(seconds)
        left = self.n - i - 1
        eta = f", ETA {left * sum(self.times) / len(self.times):.0f}s" if self.times else ""
        self.stages.status(f"quantize: layer {i + 1} of {self.n}{eta}")


def run(ck, shape, output, opts, stages, *, tk, calib, eval_tokens, bos, inv_freq, rope_scale) -> tuple[dict, dict, dict]:
    """-> (manifest fields written, report, extra summary). Writes the bundle at `output`."""
    from edge_sdk.bundle import staged_directory

    from .decoder import trace_stub
    from .pipeline import export_graphs

    device = resolve_device(opts)
    check_groups(shape, ck.arch, opts.group_size)
    src = TensorSource(ck.path, ck.safetensors)
    for n, s in expected_shapes(shape, ck.arch, None).items():
        if n in src:
            src.get(n, s, rows=slice(0, 1))
    work_path = Path(opts.work_dir) if opts.work_dir else default_work_dir(output)
    work = WorkDir(work_path, work_identity(ck, opts, calib))
    layers = Layers(ck, shape, src, calib, opts, work, device, LayerBar(stages, shape.num_layers))
    with stages("quantize"), gpu_memory_errors(device, opts):
        quantize_layers(layers)
    extra = {"work_dir": str(work_path), "device": str(device), "layer_seconds": layers.layer_seconds,
             "gpu_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    with staged_directory(output, overwrite=opts.overwrite) as tmp:
        with stages("export"):
            lm_head = functools.cache(lambda: lm_head_rtn(src, ck.arch, shape, opts.group_size))  # written, then verified
            wsec, fp16_names, groups = write_weights_streamed(tmp / "model.weights", src, work, shape, ck.arch, opts, lm_head)
            fsync_path(tmp / "model.weights")  # on disk within this stage, as --dry-run predicts it
            graphs = export_graphs(tmp, opts.graphs, lambda dtype: trace_stub(shape, ck.arch, inv_freq, rope_scale, dtype),
                                   shape, groups, fp16_names, wsec)
            for f in TOKENIZER_FILES:
                (tmp / f).write_bytes((ck.path / f).read_bytes())
        lm_q = lm_head() if opts.lm_head_dtype == "int4" else None
        report: dict = {}
        if opts.verify:
            with stages("verify"):
                report["onnx_vs_torch"] = _verify(tmp, ck, shape, src, work, opts, calib, inv_freq, rope_scale, lm_q)
        with stages("accuracy"):
            from .streamed_eval import StreamedModel, nll

            quant = StreamedModel("quant", src, work, shape, ck.arch, opts, inv_freq, rope_scale, lm_q)
            quant_nll = nll(quant, eval_tokens[: opts.eval_tokens], bos)
            flt = StreamedModel("float", src, work, shape, ck.arch, opts, inv_freq, rope_scale)
            report |= accuracy.report(nll(flt, eval_tokens[: opts.eval_tokens], bos), quant_nll)
        accuracy.settle(report, opts)
        with stages("package"):
            manifest = _package(tmp, ck, shape, opts, calib, tk, graphs, wsec, report)
    if not opts.keep_work:
        remove_work_dir(work_path)
    return manifest, report, extra | {"weights": wsec}


def _verify(tmp, ck, shape, src, work, opts, calib, inv_freq, rope_scale, lm_q) -> dict:
    params = shape.vocab_size * shape.hidden_size * 2 + shape.num_layers * (
        shape.hidden_size * (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
        + shape.hidden_size * shape.num_heads * shape.head_dim + 3 * shape.hidden_size * shape.intermediate_size)
    if params > WHOLE_GRAPH_CHECK_PARAMS:  # one piece at a time: head, each decoder layer, tail
        from .layer_check import check_layers
        from .streamed_eval import StreamedModel

        quant = StreamedModel("quant", src, work, shape, ck.arch, opts, inv_freq, rope_scale, lm_q)
        return check_layers(tmp / "model.onnx", quant, shape, calib.ids, seed=opts.seed)
    from .decoder import Decoder
    from .pipeline import StoredWeights

    weights = {n: src.get(n) for n in src.names()}
    if ck.arch.lm_head not in weights and ck.config.get("tie_word_embeddings"):
        weights[ck.arch.lm_head] = weights[ck.arch.embed]
    quantized = {}
    for i in range(shape.num_layers):
        quantized |= from_result(work.load("layer", i), opts.group_size)
    if lm_q is not None:
        quantized["lm_head"] = lm_q
    reference = Decoder(shape, StoredWeights(weights, quantized), ck.arch, inv_freq, rope_scale).eval()
    return accuracy.check_onnx(tmp / "model.onnx", reference, shape, calib.ids, seed=opts.seed)


def _package(tmp, ck, shape, opts, calib, tk, graphs, wsec, report) -> dict:
    from edge_sdk.bundle import write_manifest

    from .manifest import bundle_manifest
    from .pipeline import architecture_section, io_section

    quantization = quant_section(opts, calib) | {"lm_head_dtype": opts.lm_head_dtype, "embed_dtype": opts.embed_dtype}
    manifest = bundle_manifest(ck, architecture=architecture_section(ck.config, shape), quantization=quantization, graphs=graphs,
                               weights=wsec, io=io_section(shape), tokenizer=tk, accuracy=report)
    return write_manifest(tmp, manifest, sign_key=opts.sign_key)
