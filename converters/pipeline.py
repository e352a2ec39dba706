"""convert(): checkpoint -> int4 weights -> ONNX graphs + weights file -> checked, signed bundle."""

from __future__ import annotations

import logging
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from edge_sdk.bundle import staged_directory, write_manifest
from edge_sdk.errors import ConversionError

from . import accuracy, calibration, onnx_export
from .checkpoint import TOKENIZER_FILES, open_checkpoint
from .manifest import bundle_manifest
from .options import ConvertOptions
from .thirdparty_log import keep_log, third_party_output, work_log_path
from .workdir import default_work_dir
from .weights_file import write_weights

log = logging.getLogger(__name__)
GRAPH_FILES = {"fp32": ("model.onnx", "float32"), "fp16": ("model.fp16.onnx", "float16")}


class StoredWeights:
    """What the bundle stores, as float tensors computed on access: q * scale for int4 linears,
    fp16-rounded values for everything else (the PyTorch reference the graph is checked against)."""

    def __init__(self, weights, quantized):
        self.weights, self.quantized = weights, quantized

    def __contains__(self, name):
        return name in self.weights or name.removesuffix(".weight") in self.quantized

    def __getitem__(self, name):
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in self.quantized:
            return self.quantized[module].dequantize()
        return self.weights[name].half().float()


class Stages:
    """A progress bar over the pipeline's stages; wall time per stage and peak RSS for the summary."""

    NAMES = ("load", "quantize", "export", "verify", "accuracy", "package")

    def __init__(self, progress: bool, terminal=None, log_path=None):
        from tqdm import tqdm

        self.seconds: dict[str, float] = {}
        self.log_note = f" (library output: {log_path})" if log_path else ""
        self.bar = tqdm(total=len(self.NAMES), desc="convert", unit="stage", file=terminal or sys.stderr, disable=not progress,
                        bar_format="{desc}: {n}/{total} stages [{elapsed}] {postfix}")

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        log.info("%s ...", name)
        self.status(name)
        yield
        self.seconds[name] = round(time.perf_counter() - t, 3)
        self.bar.update(1)

    def status(self, text: str) -> None:
        """The bar's text after the stage count: what runs now, and where library output goes."""
        self.bar.set_postfix_str(text + self.log_note)

    def close(self):
        self.bar.close()

    @staticmethod
    def peak_rss_bytes() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def architecture_section(cfg: dict, shape) -> dict:
    rope = cfg.get("rope_parameters") or {}
    return {
        "name": cfg["architectures"][0], "hidden_size": shape.hidden_size, "num_layers": shape.num_layers,
        "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size, "intermediate_size": shape.intermediate_size, "rms_norm_eps": shape.rms_norm_eps,
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 4096)),
        "rope_theta": float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
        "rope_scaling": cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None),
        "tie_word_embeddings": shape.tie_word_embeddings,
    }


def tokenizer_section(ck) -> dict:
    import json

    tc = json.loads((ck.path / "tokenizer_config.json").read_text())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ck.path / "tokenizer.json"))

    def tid(v):
        v = v.get("content") if isinstance(v, dict) else v
        return tok.token_to_id(v) if isinstance(v, str) else None

    eos = ck.config.get("eos_token_id")
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []), *([tid(tc.get("eos_token"))] if tid(tc.get("eos_token")) is not None else [])})
    return {
        "files": list(TOKENIZER_FILES), "chat_template": tc.get("chat_template"),
        "bos_token_id": tid(tc.get("bos_token")) if tc.get("bos_token") else ck.config.get("bos_token_id"),
        "eos_token_ids": eos_ids,
        "pad_token_id": tid(tc.get("pad_token")) if tc.get("pad_token") else ck.config.get("pad_token_id"),
        "add_bos_token": bool(tc.get("add_bos_token", True)),
    }


def convert(model_dir, output, *, log_file=None, **options) -> dict:
    """Convert a Hugging Face checkpoint directory into a release bundle at `output`; return the summary.

    What the libraries underneath print goes to `log_file` (default: the work directory's log, moved
    under the cache when the conversion ends well; see thirdparty_log), named in the
    summary as "log"; the terminal shows the progress bar only."""
    opts = options if isinstance(options, ConvertOptions) else ConvertOptions(**options)
    work_log = None if log_file else work_log_path(opts.work_dir or default_work_dir(output))
    log_path = Path(log_file) if log_file else work_log
    try:
        with third_party_output(log_path) as terminal:
            stages = Stages(opts.progress, terminal, log_path)
            try:
                summary = _convert(model_dir, output, opts, stages)
            finally:
                stages.close()
    except ConversionError as exc:
        if exc.__cause__ is not None:  # a library failed: its own account is in the log
            exc.args = (f"{exc} [library output: {log_path}]",)
        raise
    if work_log is not None and work_log.exists():
        log_path = keep_log(work_log)
    return summary | {"log": str(log_path)}


def _convert(model_dir, output, opts: ConvertOptions, stages: Stages) -> dict:
    import torch
    from tokenizers import Tokenizer

    from edge_sdk.modelspec import shape_from_config

    from .decoder import Decoder, rope_tables, trace_stub
    from .quantize import quantize_checkpoint

    torch.manual_seed(opts.seed)
    with stages("load"):
        ck = open_checkpoint(model_dir)
        shape = shape_from_config(ck.config, str(ck.path / "config.json"))
        tok = Tokenizer.from_file(str(ck.path / "tokenizer.json"))
        tk = tokenizer_section(ck)
        text = calibration.read_text(opts.calib) if opts.calib else calibration.default_text()
        tokens = calibration.tokenize(tok, text)
        eval_tokens = calibration.tokenize(tok, calibration.read_text(opts.eval_text)) if opts.eval_text else None
        if not opts.calib and eval_tokens is None:
            tokens, eval_tokens = calibration.split_default(tokens)
        elif eval_tokens is None:
            eval_tokens = calibration.split_default(calibration.tokenize(tok, calibration.default_text()))[1]
        bos = tk["bos_token_id"] if tk["add_bos_token"] else None
        calib = calibration.windows(tokens, opts.nsamples, opts.seqlen, bos)
        inv_freq, rope_scale = rope_tables(ck.config, ck.arch)
    if ck.quantization_config is None or ck.arch.mla:  # float checkpoint: one decoder layer at a time
        from . import streamed_convert

        if ck.arch.mla:  # MLA + MoE, DeepSeek-V2 or V3 (deepseek_v2.py refuses what it does not convert)
            from . import deepseek_v2 as streamed_convert
        elif opts.dry_run:
            from .predict import dry_run

            return dry_run(ck, shape, output, opts, stages, calib=calib, eval_tokens=len(eval_tokens))
        manifest, report, extra = streamed_convert.run(ck, shape, output, opts, stages, tk=tk, calib=calib, eval_tokens=eval_tokens,
                                                       bos=bos, inv_freq=inv_freq, rope_scale=rope_scale)
        return {"source": str(ck.path), "output": str(Path(output).absolute()),
                "files": {k: v["size"] for k, v in manifest["files"].items()},
                "weight_bytes": sum(t["nbytes"] for t in extra.pop("weights")["tensors"].values()),
                "seconds": stages.seconds, "peak_rss_bytes": stages.peak_rss_bytes(), "accuracy": report,
                "quantization": manifest["quantization"], "signed": opts.sign_key is not None} | extra
    with stages("quantize"):
        qr = quantize_checkpoint(ck, shape, calib, opts)
    weights, quantized = qr.weights, qr.quantized
    deq = StoredWeights(weights, quantized)
    reference = Decoder(shape, deq, ck.arch, inv_freq, rope_scale).eval()
    summary: dict = {"source": str(ck.path), "output": str(Path(output).absolute())}
    with staged_directory(output, overwrite=opts.overwrite) as tmp:
        with stages("export"):
            tensors, fp16_names = onnx_export.stored_tensors(weights, quantized, ck.arch, shape.num_layers)
            wsec = write_weights(tmp / "model.weights", tensors)
            del tensors  # 1.2 GB of bytes for a 1.5B model
            graphs = export_graphs(tmp, opts.graphs, lambda dtype: trace_stub(shape, ck.arch, inv_freq, rope_scale, dtype),
                                   shape, quantized, fp16_names, wsec)
            for f in TOKENIZER_FILES:
                (tmp / f).write_bytes((ck.path / f).read_bytes())
        report: dict = {}
        if opts.verify:
            with stages("verify"):
                report["onnx_vs_torch"] = accuracy.check_onnx(tmp / "model.onnx", reference, shape, calib.ids, seed=opts.seed)
        with stages("accuracy"):
            # one fp32 model in memory at a time
            quant_nll = accuracy.nll(reference, eval_tokens[: opts.eval_tokens], bos)
            del reference
            float_model = Decoder(shape, weights, ck.arch, inv_freq, rope_scale).eval()
            report |= accuracy.report(accuracy.nll(float_model, eval_tokens[: opts.eval_tokens], bos), quant_nll)
            del float_model
        # an imported checkpoint has no float weights: its "float" side is the dequantized checkpoint
        accuracy.settle(report, opts, "dequantized GPTQ checkpoint" if qr.section.get("imported") else "float checkpoint")
        with stages("package"):
            quantization = qr.section | {"lm_head_dtype": opts.lm_head_dtype if "lm_head" in quantized else "fp16",
                                         "embed_dtype": opts.embed_dtype}
            manifest = bundle_manifest(ck, architecture=architecture_section(ck.config, shape), quantization=quantization,
                                       graphs=graphs, weights=wsec, io=io_section(shape), tokenizer=tk, accuracy=report)
            manifest = write_manifest(tmp, manifest, sign_key=opts.sign_key)
    summary |= {
        "files": {k: v["size"] for k, v in manifest["files"].items()},
        "weight_bytes": sum(t["nbytes"] for t in wsec["tensors"].values()),
        "seconds": stages.seconds,
        "peak_rss_bytes": stages.peak_rss_bytes(),
        "accuracy": report,
        "quantization": manifest["quantization"],
        "signed": opts.sign_key is not None,
    }
    return summary


def export_graphs(tmp, names, stub, shape, quantized, fp16_names, wsec) -> dict:
    """Each graph `names` lists, traced from stub(dtype) (the model at a small size) with its initializers
    pointed at model.weights, saved in `tmp` -> the manifest's graphs section."""
    import torch

    graphs = {}
    for g in names:
        fname, act = GRAPH_FILES[g]
        model = onnx_export.trace(stub(torch.float32 if g == "fp32" else torch.float16), shape.num_layers)
        onnx_export.rewrite(model, quantized, fp16_names, act, wsec, "model.weights", shape.vocab_size)
        onnx_export.save(model, tmp / fname)
        graphs[g] = {"file": fname, "activation_dtype": act}
    return graphs


def io_section(shape) -> dict:
    inputs, outputs = onnx_export.io_names(shape.num_layers)
    return {
        "inputs": inputs, "outputs": outputs,
        "kv": {"num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
               "layout": "BHSD", "past": "past_key_values.{i}.{kind}", "present": "present.{i}.{kind}"},
    }
