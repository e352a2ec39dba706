"""End-to-end conversion: manifest contract, reproducibility, calibration input, clear errors, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from edge_sdk.bundle import verify_bundle  # noqa: E402
from edge_sdk.converters import convert  # noqa: E402
from edge_sdk.errors import ConfigError, ConversionError, UnsupportedArchitectureError  # noqa: E402

FAST = dict(nsamples=4, seqlen=64, eval_tokens=128)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_manifest_carries_the_contract(tiny_bundle, tiny_model_dir, arch):
    m = verify_bundle(tiny_bundle(arch))
    cfg = json.loads((tiny_model_dir(arch) / "config.json").read_text())
    assert m["format"] == "edge-sdk-bundle" and m["opset"] == 21 and m["ir_version"] == 10
    assert m["source"]["config"] == cfg
    assert set(m["source"]["files"]) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    a = m["architecture"]
    assert (a["name"], a["hidden_size"], a["num_layers"], a["num_heads"], a["num_kv_heads"], a["head_dim"], a["vocab_size"]) == (
        cfg["architectures"][0], 256, 2, 4, 2, 64, cfg["vocab_size"])
    assert a["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    q = m["quantization"]
    assert (q["method"], q["bits"], q["group_size"], q["symmetric"], q["act_order"]) == ("gptq", 4, 128, True, "act_group_aware")
    assert q["calibration"]["nsamples"] == 8 and q["calibration"]["seqlen"] == 128 and len(q["calibration"]["sha256"]) == 64
    assert (q["embed_dtype"], q["lm_head_dtype"], q["scale_dtype"]) == ("fp16", "int4", "fp16")
    assert m["graphs"] == {"fp32": {"file": "model.onnx", "activation_dtype": "float32"}}
    kv = m["io"]["kv"]
    assert kv == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "layout": "BHSD",
                  "past": "past_key_values.{i}.{kind}", "present": "present.{i}.{kind}"}
    assert m["io"]["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert m["io"]["outputs"][0] == "logits" and "present.1.value" in m["io"]["outputs"]
    t = m["tokenizer"]
    assert t["files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert "<｜Assistant｜>" in t["chat_template"] and t["bos_token_id"] == 0 and t["eos_token_ids"] == [1] and t["pad_token_id"] == 2
    acc = m["accuracy"]
    assert acc["onnx_vs_torch"]["greedy_tokens_equal"] and acc["onnx_vs_torch"]["max_abs_logit_diff"] < 1e-3
    assert acc["eval_tokens"] > 100 and 0 < acc["top1_agreement"] <= 1


def test_same_input_gives_byte_identical_bundles(tiny_model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    convert(tiny_model_dir("llama"), a, **FAST)
    convert(tiny_model_dir("llama"), b, **FAST)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_jsonl_calibration_is_used_and_hashed(tiny_model_dir, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + len(str(x))\n"}) for i in range(40)))
    s = convert(tiny_model_dir("qwen2"), tmp_path / "b", method="rtn", calib=str(calib), **FAST)
    d = convert(tiny_model_dir("qwen2"), tmp_path / "c", method="rtn", **FAST)
    assert s["quantization"]["calibration"]["sha256"] != d["quantization"]["calibration"]["sha256"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    with pytest.raises(ConversionError, match='bad.jsonl:1: no "text"'):
        convert(tiny_model_dir("qwen2"), tmp_path / "d", calib=str(bad), **FAST)


def test_unsupported_architecture_names_the_supported_ones(model_copy, tmp_path):
    d = model_copy("qwen2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="MistralForCausalLM") as e:
        convert(d, tmp_path / "out", **FAST)
    assert "Qwen2ForCausalLM" in str(e.value) and "LlamaForCausalLM" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_is_a_clear_error(model_copy, tmp_path):
    d = model_copy("llama")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="tokenizer.json") as e:
        convert(d, tmp_path / "out", **FAST)
    assert "copy tokenizer.json" in str(e.value)


def test_bad_options_are_config_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="group_size"):
        convert(tiny_model_dir("qwen2"), tmp_path / "o", group_size=100)
    with pytest.raises(ConfigError, match="desc_act"):
        convert(tiny_model_dir("qwen2"), tmp_path / "o", act_order="desc_act")
    with pytest.raises(ConversionError, match="not a multiple of group_size 512"):
        convert(tiny_model_dir("qwen2"), tmp_path / "o", group_size=512, method="rtn")
    for kw in ({"device": "cuda:x"}, {"device": "cuda:"}, {"devices": ("cudafoo",)}, {"devices": ("cuda:0", "cuda:one")}):
        with pytest.raises(ConfigError, match="device"):
            convert(tiny_model_dir("qwen2"), tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()


def test_cli_convert_json_and_signature(tiny_model_dir, tmp_path):
    keys = tmp_path / "keys"
    run = lambda *a: subprocess.run([sys.executable, "-m", "edge_sdk.cli.main", *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    assert run("verify", "--keygen", str(keys)).returncode == 0
    r = run("convert", str(tiny_model_dir("qwen2")), "-o", str(tmp_path / "b"), "--method", "rtn", "--nsamples", "2",
            "--seqlen", "32", "--eval-tokens", "64", "--sign-key", str(keys / "signing.key"), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["signed"] and set(s["seconds"]) >= {"load", "quantize", "export", "verify", "accuracy", "package"}
    assert s["peak_rss_bytes"] > 0 and s["weight_bytes"] <= s["files"]["model.weights"]
    assert (tmp_path / "b" / "manifest.sig").exists()
    r = run("verify", str(tmp_path / "b"), "--key", str(keys / "signing.pub"))
    assert r.returncode == 0 and "signature verified" in r.stdout
    r = run("convert", str(tmp_path / "nothing"), "-o", str(tmp_path / "c"))
    assert r.returncode == 5 and "not a model directory" in r.stderr


def test_calibration_windows_are_fixed_and_repeat_short_text():
    from edge_sdk.converters.calibration import windows

    w = windows(list(range(10)), nsamples=3, seqlen=5, bos=99)
    assert w.ids == [[99, 0, 1, 2, 3], [99, 4, 5, 6, 7], [99, 8, 9, 0, 1]]
    assert w.sha256 == windows(list(range(10)), 3, 5, 99).sha256 != windows(list(range(10)), 3, 5, None).sha256
    with pytest.raises(ConversionError, match="no tokens"):
        windows([], 1, 8, None)


def test_checkpoint_without_pad_token_converts(tmp_path):
    """A Llama-3-style tokenizer (no pad_token, config pad_token_id null) converts with GPTQ; the bundle
    keeps the checkpoint's tokenizer as it is and its graph matches the PyTorch reference."""
    from edge_sdk.converters.tiny import build_model_dir

    d = build_model_dir(tmp_path / "nopad", "qwen2", pad_token=False)
    convert(d, tmp_path / "b", log_file=tmp_path / "convert.log", **FAST)
    m = verify_bundle(tmp_path / "b")
    assert m["quantization"]["method"] == "gptq" and m["tokenizer"]["pad_token_id"] is None
    assert (tmp_path / "b" / "tokenizer_config.json").read_bytes() == (d / "tokenizer_config.json").read_bytes()
    check = m["accuracy"]["onnx_vs_torch"]
    assert check["greedy_tokens_equal"] and check["max_abs_logit_diff"] < 1e-3


THIRD_PARTY_LINES = ("GPT-QModel", "INFO ", "WARN", "Failed to load", "_pytree", "Tokenicer", "Traceback")


def test_cli_convert_prints_progress_and_result_only(tiny_model_dir, tmp_path):
    """Library output (GPTQModel banners, torchao, torch warnings) goes to one log file, in the work
    directory while converting and under EDGE_SDK_CACHE/logs once done, never to the terminal."""
    import os

    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    env = dict(os.environ, EDGE_SDK_CACHE=str(cache))
    r = subprocess.run([sys.executable, "-m", "edge_sdk.cli.main", "convert", str(tiny_model_dir("qwen2")), "-o", "b",
                        "--nsamples", "4", "--seqlen", "64", "--eval-tokens", "128"],
                       capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["b"]
    assert [x for x in THIRD_PARTY_LINES if x in r.stderr + r.stdout] == []
    assert [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("convert: ")] == []  # our progress bar only
    (log,) = (cache / "logs").glob("convert-*.log")
    assert f"library log   {log}" in r.stdout
    assert f"(library output: {cwd / 'b.work' / 'library-output.log'})" in r.stderr  # the bar points at it while converting
    assert "GPT-QModel" in log.read_text(errors="replace")
