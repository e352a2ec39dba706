"""Bundle integrity: hashes, sizes, signatures, atomic writing; the planner reads the bundle's settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from edge_sdk.bundle import (
    generate_keypair,
    read_manifest,
    staged_directory,
    verify_bundle,
    write_manifest,
)
from edge_sdk.errors import BundleError, BundleIntegrityError


@pytest.fixture
def bundle(tmp_path, tiny_bundle):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("qwen2"), dst)
    return dst


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("cryptography")
    d = tmp_path_factory.mktemp("keys")
    return generate_keypair(d / "a"), generate_keypair(d / "b")


def test_manifest_lists_every_file_with_size_and_hash(bundle):
    m = verify_bundle(bundle)
    on_disk = sorted(p.name for p in bundle.iterdir() if p.name not in ("manifest.json", "manifest.sig"))
    assert sorted(m["files"]) == on_disk
    assert {"model.onnx", "model.weights", "tokenizer.json", "tokenizer_config.json"} <= set(m["files"])
    for rel, meta in m["files"].items():
        assert meta["size"] == (bundle / rel).stat().st_size and len(meta["sha256"]) == 64


def test_flipped_byte_is_detected_and_named(bundle):
    p = bundle / "model.weights"
    with open(p, "r+b") as f:
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(BundleIntegrityError, match="model.weights fails its sha256"):
        verify_bundle(bundle)


def test_swapped_file_is_detected_and_named(bundle, tiny_bundle):
    shutil.copy(tiny_bundle("llama") / "model.onnx", bundle / "model.onnx")
    with pytest.raises(BundleIntegrityError, match="model.onnx"):
        verify_bundle(bundle)


def test_same_size_swap_is_detected(bundle):
    data = (bundle / "tokenizer_config.json").read_bytes()
    (bundle / "tokenizer_config.json").write_bytes(data.replace(b'"add_bos_token": true', b'"add_bos_token": fals'))
    assert (bundle / "tokenizer_config.json").stat().st_size == len(data)
    with pytest.raises(BundleIntegrityError, match="tokenizer_config.json fails its sha256"):
        verify_bundle(bundle)


def test_missing_file_and_path_outside_bundle(bundle):
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleIntegrityError, match="tokenizer.json is missing"):
        verify_bundle(bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = {"../outside": {"size": 1, "sha256": "0" * 64}}
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleIntegrityError, match="outside the bundle"):
        verify_bundle(bundle)


def test_signature_verifies_with_the_right_key_only(bundle, keys):
    (priv_a, pub_a), (_, pub_b) = keys
    manifest = json.loads((bundle / "manifest.json").read_text())
    write_manifest(bundle, {k: v for k, v in manifest.items() if k not in ("files", "schema_version")}, sign_key=priv_a)
    assert verify_bundle(bundle, pub_a)["format"] == "edge-sdk-bundle"
    with pytest.raises(BundleIntegrityError, match="signature does not match"):
        verify_bundle(bundle, pub_b)
    # a manifest edited after signing (e.g. to hide a swapped file) fails the signature
    m = json.loads((bundle / "manifest.json").read_text())
    m["accuracy"]["ppl_quant"] = 1.0
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))
    with pytest.raises(BundleIntegrityError, match="signature does not match"):
        verify_bundle(bundle, pub_a)


def test_unsigned_bundle_is_refused_when_a_key_is_trusted(bundle, keys):
    with pytest.raises(BundleIntegrityError, match="manifest.sig is missing"):
        verify_bundle(bundle, keys[0][1])


def test_staged_directory_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_directory(tmp_path / "out") as d:
            (d / "model.onnx").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_never_leaves_a_bundle(tmp_path):
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from edge_sdk.bundle import staged_directory\n"
        "with staged_directory(Path(sys.argv[1])) as d:\n"
        "    (d / 'model.weights').write_bytes(b'\\0' * 4096)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, timeout=60)
    assert r.returncode == -9
    assert not (tmp_path / "out").exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".out.partial-") for p in leftovers)
    with pytest.raises(BundleError, match="partial"):
        read_manifest(leftovers[0])


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        with staged_directory(tmp_path / "out"):
            pass
    with staged_directory(tmp_path / "out", overwrite=True) as d:
        (d / "f").write_text("new")
    assert (tmp_path / "out" / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_plan_of_a_bundle_matches_its_weight_bytes(tiny_bundle, arch):
    from edge_sdk.planner import plan

    b = tiny_bundle(arch)
    m = read_manifest(b)
    stored = sum(t["nbytes"] for t in m["weights"]["tensors"].values())
    p = plan(b, "orin-nano-8gb")
    assert p.quant["lm_head_dtype"] == m["quantization"]["lm_head_dtype"]
    assert abs(stored - p.weight_bytes["total"]) / stored < 0.03


def test_plan_follows_bundle_settings(tmp_path, tiny_bundle):
    from edge_sdk.planner import plan

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle("qwen2"), b)
    m = json.loads((b / "manifest.json").read_text())
    m["quantization"]["lm_head_dtype"] = "fp16"
    (b / "manifest.json").write_text(json.dumps(m))
    assert plan(b).weight_bytes["lm_head"] == \
        m["architecture"]["vocab_size"] * m["architecture"]["hidden_size"] * 2


def test_cli_verify_json(tiny_bundle, keys):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "edge_sdk.cli.main", "verify", str(tiny_bundle("qwen2")), "--json"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True and out["files"] == 4
    r = subprocess.run([sys.executable, "-m", "edge_sdk.cli.main", "verify", str(tiny_bundle("qwen2")), "--key", str(keys[0][1])],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 4 and "manifest.sig is missing" in r.stderr
