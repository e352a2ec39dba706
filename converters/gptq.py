"""GPTQ int4 with GPTQModel: symmetric, contiguous groups (act_group_aware), damping, fixed seed.

GPTQModel quantizes and saves a standard GPTQ checkpoint into a scratch directory; that checkpoint
is then read back by the importer, so the bundle holds exactly the integers GPTQModel chose.

Pad token: GPTQModel hands a checkpoint without one to tokenicer, which takes the tokenizer's pad id
and writes it into config.pad_token_id before the model is built. Under transformers 5 a qwen2
tokenizer without a pad token gets `<|endoftext|>` appended after the vocabulary as unk and pad, so
pad_token_id == vocab_size and nn.Embedding fails its padding_idx assertion. Such a checkpoint is
handed to GPTQModel as a view whose config and tokenizer_config name an in-vocabulary id (the EOS
token) as pad. The calibration windows are unpadded and the padding row is loaded from the weights,
so the quantized integers do not depend on it; the bundle keeps the checkpoint's own tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
import sys
import tempfile

import torch

from edge_sdk.errors import ConversionError, require

log = logging.getLogger(__name__)


def gptq_quantize(ck, calib, opts, names: list[str]) -> tuple[dict, dict]:
    # GPTQModel prints banners, configs and logs on stdout; keep stdout for the CLI's --json
    with contextlib.redirect_stdout(sys.stderr):
        return _gptq_quantize(ck, calib, opts, names)


def _gptq_quantize(ck, calib, opts, names: list[str]) -> tuple[dict, dict]:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    gm = require("gptqmodel", "convert")
    from safetensors.torch import load_file

    from .gptq_import import import_linear, settings

    qc = gm.QuantizeConfig(bits=opts.bits, group_size=opts.group_size, sym=True, desc_act=False,
                           act_group_aware=opts.act_order == "act_group_aware", damp_percent=opts.damp_percent)
    torch.manual_seed(opts.seed)
    data = [{"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)} for ids in calib.ids]
    with tempfile.TemporaryDirectory(prefix="edge-sdk-gptq-") as scratch:
        source = gptq_source(ck, Path(scratch, "source"))
        stage = "loading"
        try:
            with _stats_in(Path(scratch, "stats")):
                model = gm.GPTQModel.load(str(source), qc, device="cpu", dtype=torch.float32)
                stage = "quantizing"
                model.quantize(data, batch_size=1, calibration_sort=None)
                stage = "saving"
                model.save(str(Path(scratch, "out")))
        except Exception as exc:  # noqa: BLE001 - any library failure becomes one line naming the stage
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConversionError(f"GPTQModel failed while {stage} {ck.path}: {type(exc).__name__}: {first}",
                                  hint="try --method rtn to check the rest of the pipeline, or another --group-size; "
                                       "--debug shows the traceback") from exc
        del model
        out = Path(scratch, "out")
        sd = {}
        for f in sorted(out.glob("*.safetensors")):
            sd |= load_file(f)
        saved = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
        st = settings(saved, "GPTQModel output")
        quantized = {n: import_linear(sd, n, st) for n in names}
    return quantized, {"method": "gptq", "engine": f"gptqmodel {gm.__version__ if hasattr(gm, '__version__') else ''}".strip()}


def pad_token_id(ck) -> tuple[int, str] | None:
    """(id, token) to declare as pad when the checkpoint lacks a usable one; None when it has one."""
    from tokenizers import Tokenizer

    vocab = int(ck.config["vocab_size"])
    inside = lambda i: isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab  # noqa: E731
    tok = Tokenizer.from_file(str(ck.path / "tokenizer.json"))
    tc = json.loads((ck.path / "tokenizer_config.json").read_text())
    declared = tc.get("pad_token")
    declared = declared.get("content") if isinstance(declared, dict) else declared
    tok_pad = tok.token_to_id(declared) if isinstance(declared, str) else None
    cfg_pad = ck.config.get("pad_token_id")
    if inside(tok_pad) and cfg_pad in (None, tok_pad):
        return None
    eos = ck.config.get("eos_token_id")
    for i in [cfg_pad, tok_pad, *(eos if isinstance(eos, list) else [eos]), ck.config.get("bos_token_id"), 0]:
        if inside(i) and tok.id_to_token(i) is not None:
            return i, tok.id_to_token(i)
    raise ConversionError(f"{ck.path}: no token id inside the vocabulary ({vocab}) to pad with",
                          hint="set pad_token in tokenizer_config.json")


def gptq_source(ck, view: Path) -> Path:
    """The directory GPTQModel loads: the checkpoint itself, or a view of it that names a pad token."""
    pad = pad_token_id(ck)
    if pad is None:
        return ck.path
    view.mkdir()
    for f in ck.path.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json"):
            (view / f.name).symlink_to(f.absolute())
    (view / "config.json").write_text(json.dumps(ck.config | {"pad_token_id": pad[0]}))
    tc = json.loads((ck.path / "tokenizer_config.json").read_text())
    (view / "tokenizer_config.json").write_text(json.dumps(tc | {"pad_token": pad[1]}, ensure_ascii=False))
    log.info("GPTQModel sees pad token %r (id %d): the checkpoint names none inside its vocabulary", pad[1], pad[0])
    return view


@contextlib.contextmanager
def _stats_in(directory: Path):
    """GPTQModel writes per-layer statistics to logs/ under the current directory (a relative path in
    gptqmodel.looper.loop_processor); keep them in the scratch directory instead."""
    from gptqmodel.looper import loop_processor

    if not hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        yield
        return
    old = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = directory
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = old
