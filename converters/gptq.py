"""GPTQ int4 with GPTQModel: symmetric, contiguous groups (act_group_aware), damping, fixed seed.

GPTQModel quantizes and saves a standard GPTQ checkpoint into a scratch directory; that checkpoint
is then read back by the importer, so the bundle holds exactly the integers GPTQModel chose.
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
        try:
            model = gm.GPTQModel.load(str(ck.path), qc, device="cpu", dtype=torch.float32)
            model.quantize(data, batch_size=1, calibration_sort=None)
            model.save(scratch)
        except (ValueError, RuntimeError) as exc:
            raise ConversionError(f"GPTQModel failed on {ck.path}: {exc}",
                                  hint="try --method rtn to check the rest of the pipeline, or another --group-size") from exc
        del model
        sd = {}
        for f in sorted(os.listdir(scratch)):
            if f.endswith(".safetensors"):
                sd |= load_file(os.path.join(scratch, f))
        saved = json.loads(Path(scratch, "config.json").read_text()).get("quantization_config") or {}
        st = settings(saved, "GPTQModel output")
        quantized = {n: import_linear(sd, n, st) for n in names}
    return quantized, {"method": "gptq", "engine": f"gptqmodel {gm.__version__ if hasattr(gm, '__version__') else ''}".strip()}
