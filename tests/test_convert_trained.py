"""Accuracy report on a small *trained* model (scripts/train_tiny.py, cached under ~/.cache/edge-sdk):
int4 costs little perplexity, GPTQ agrees with the float model more often than round-to-nearest,
and --max-ppl-increase stops a conversion that loses more."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from edge_sdk.errors import AccuracyGateError  # noqa: E402

CALIB = dict(nsamples=32, seqlen=256, eval_tokens=2048, lm_head_dtype="fp16")


@pytest.fixture(scope="module")
def trained():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_tiny import DEFAULT_OUT

    if not (DEFAULT_OUT / "model.safetensors").exists() or not (DEFAULT_OUT / "calib.txt").exists():
        pytest.skip(f"no trained tiny model in {DEFAULT_OUT}: run `python scripts/train_tiny.py` (about 3 minutes on one core)")
    return DEFAULT_OUT


@pytest.fixture(scope="module")
def reports(trained, tmp_path_factory):
    from edge_sdk.converters import convert

    root = tmp_path_factory.mktemp("trained")
    return {m: convert(trained, root / m, method=m, calib=str(trained / "calib.txt"), eval_text=str(trained / "eval.txt"), **CALIB)
            for m in ("gptq", "rtn")}


def test_int4_perplexity_increase_is_small_and_reported(reports, trained):
    import json

    from edge_sdk.bundle import verify_bundle

    acc = reports["gptq"]["accuracy"]
    assert acc["eval_tokens"] == 2047
    assert acc["ppl_float"] < 300  # the model is really trained (vocabulary is 2048)
    assert abs(acc["ppl_increase_percent"]) < 2.0
    assert acc["top1_agreement"] > 0.9
    manifest = verify_bundle(reports["gptq"]["output"])
    assert manifest["accuracy"]["ppl_quant"] == acc["ppl_quant"]
    assert json.loads((trained / "training.json").read_text())["held_out_ppl"] > 0


def test_gptq_agrees_with_the_float_model_more_than_rtn(reports):
    g, r = reports["gptq"]["accuracy"], reports["rtn"]["accuracy"]
    assert g["top1_agreement"] > r["top1_agreement"]
    assert g["nll_quant"] - g["nll_float"] < r["nll_quant"] - r["nll_float"]


def test_accuracy_gate_fails_without_leaving_a_bundle(trained, reports, tmp_path):
    from edge_sdk.converters import convert

    rise = reports["rtn"]["accuracy"]["ppl_increase_percent"]
    assert rise > 0.02
    with pytest.raises(AccuracyGateError, match="perplexity rose") as e:
        convert(trained, tmp_path / "gated", method="rtn", calib=str(trained / "calib.txt"), eval_text=str(trained / "eval.txt"),
                max_ppl_increase=rise / 2, **CALIB)
    assert "--max-ppl-increase" in str(e.value)
    assert list(tmp_path.iterdir()) == []
