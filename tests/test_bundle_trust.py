"""Bundle trust: one trusted key everywhere, a manifest checked before it is believed, no symlinks,
no unlisted or outside files, caches bound to the bundle by hash, no partial bundle that verifies."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edge_sdk
from edge_sdk.bundle import (
    MANIFEST_MAX_BYTES,
    dumps_manifest,
    parse_manifest,
    sign,
    staged_directory,
    verify_bundle,
)
from edge_sdk.errors import BundleError, BundleIntegrityError
from test_bundle import bundle, keys  # noqa: F401  (fixtures: a copied tiny bundle, two signing keypairs)

CPU = dict(provider="cpu", threads=1, accuracy_level=1, log_provider=False)


def manifest_of(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_bytes())


def rewrite(b: Path, manifest: dict | bytes, key: Path | None = None) -> None:
    data = manifest if isinstance(manifest, bytes) else dumps_manifest(manifest)
    (b / "manifest.json").write_bytes(data)
    (b / "manifest.sig").unlink(missing_ok=True)
    if key is not None:
        (b / "manifest.sig").write_bytes(sign(data, key))


def greedy(b: Path, **kw) -> list[int]:
    m = edge_sdk.load(b, **CPU, **kw)
    return m.generate("hello world", max_new_tokens=6).token_ids


# --- 4. the manifest is checked before it is believed ------------------------------------------------------


def _bad_manifests(valid: dict) -> dict[str, bytes]:
    def edit(fn):
        m = json.loads(json.dumps(valid))
        fn(m)
        return dumps_manifest(m)

    tensor = next(iter(valid["weights"]["tensors"]))
    return {
        "list": b"[1,2,3]",
        "string": b'"hello"',
        "number": b"7",
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "deep-object": b'{"a":' * 5000 + b"1" + b"}" * 5000,
        "truncated": dumps_manifest(valid)[:200],
        "not-utf8": b"\xff\xfe{}",
        "nan": dumps_manifest(valid).replace(b'"schema_version": 1', b'"schema_version": NaN'),
        "files-entry-string": edit(lambda m: m["files"].__setitem__("model.onnx", "abc")),
        "files-string": edit(lambda m: m.__setitem__("files", "model.onnx")),
        "size-string": edit(lambda m: m["files"]["model.onnx"].__setitem__("size", "66516")),
        "sha-int": edit(lambda m: m["files"]["model.onnx"].__setitem__("sha256", 5)),
        "nbytes-ncytes": edit(lambda m: m["weights"]["tensors"][tensor].__setitem__("ncytes", m["weights"]["tensors"][tensor].pop("nbytes"))),
        "tensor-past-end": edit(lambda m: m["weights"]["tensors"][tensor].__setitem__("offset", 10**12)),
        "graphs-list": edit(lambda m: m.__setitem__("graphs", ["model.onnx"])),
        "graph-outside": edit(lambda m: m["graphs"]["fp32"].__setitem__("file", "../../outside/model.onnx")),
        "graph-unlisted": edit(lambda m: m["graphs"]["fp32"].__setitem__("file", "other.onnx")),
        "weights-outside": edit(lambda m: m["weights"].__setitem__("file", "/etc/passwd")),
        "tokenizer-file-unlisted": edit(lambda m: m["tokenizer"].__setitem__("files", ["tokenizer.json", "../x.json"])),
        "eos-string": edit(lambda m: m["tokenizer"].__setitem__("eos_token_ids", "2")),
        "architecture-list": edit(lambda m: m.__setitem__("architecture", [])),
        "arch-layers-string": edit(lambda m: m["architecture"].__setitem__("num_layers", "2")),
        "schema-bool": edit(lambda m: m.__setitem__("schema_version", True)),
        "files-dotdot": edit(lambda m: m["files"].__setitem__("../x", {"sha256": "0" * 64, "size": 1})),
        "files-absolute": edit(lambda m: m["files"].__setitem__("/x", {"sha256": "0" * 64, "size": 1})),
        "files-manifest": edit(lambda m: m["files"].__setitem__("manifest.json", {"sha256": "0" * 64, "size": 1})),
    }


BAD = ["list", "string", "number", "deep", "deep-object", "truncated", "not-utf8", "nan", "files-entry-string",
       "files-string", "size-string", "sha-int", "nbytes-ncytes", "tensor-past-end", "graphs-list", "graph-outside",
       "graph-unlisted", "weights-outside", "tokenizer-file-unlisted", "eos-string", "architecture-list",
       "arch-layers-string", "schema-bool", "files-dotdot", "files-absolute", "files-manifest"]


@pytest.mark.parametrize("case", BAD)
def test_bad_manifest_is_one_bundle_error(bundle, case):
    data = _bad_manifests(manifest_of(bundle))[case]
    rewrite(bundle, data)
    with pytest.raises(BundleError) as e:
        verify_bundle(bundle)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["list", "deep", "files-entry-string", "nbytes-ncytes", "graph-outside"])
def test_bad_manifest_signed_by_the_trusted_key_is_still_refused(bundle, keys, case):
    (priv, pub), _ = keys
    rewrite(bundle, _bad_manifests(manifest_of(bundle))[case], key=priv)
    with pytest.raises(BundleError):
        edge_sdk.load(bundle, key=str(pub), **CPU)


def test_signature_is_checked_over_raw_bytes_before_parsing(bundle, keys):
    (priv, pub), _ = keys
    rewrite(bundle, manifest_of(bundle), key=priv)
    (bundle / "manifest.json").write_bytes(b"[" * 100_000)  # would be a RecursionError if parsed first
    with pytest.raises(BundleIntegrityError, match="signature"):
        verify_bundle(bundle, pub)


def test_oversized_manifest_is_refused_without_reading_it(bundle, monkeypatch):
    with open(bundle / "manifest.json", "ab") as f:
        f.truncate(MANIFEST_MAX_BYTES + 10)
    reads = []
    real = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real(fd, n))
    with pytest.raises(BundleError, match="larger than"):
        verify_bundle(bundle)
    assert sum(reads) <= MANIFEST_MAX_BYTES + 1 + 2**20


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_are_a_manifest_or_a_bundle_error(data):
    try:
        assert isinstance(parse_manifest(data, "m"), dict)
    except BundleError:
        pass


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.lists(st.sampled_from(["files", "weights", "tensors", "graphs", "fp32", "file", "tokenizer", "architecture",
                                      "model.onnx", "size", "sha256", "nbytes", "eos_token_ids", "schema_version"]),
                     min_size=1, max_size=4), value=JSON)
def test_any_edited_field_gives_a_manifest_or_a_bundle_error(tiny_bundle, path, value):
    m = json.loads((tiny_bundle("qwen2") / "manifest.json").read_bytes())
    node = m
    for k in path[:-1]:
        if not isinstance(node, dict):
            break
        node = node.setdefault(k, {})
    if isinstance(node, dict):
        node[path[-1]] = value
    try:
        assert isinstance(parse_manifest(dumps_manifest(m), "m"), dict)
    except BundleError:
        pass


# --- 3. one trusted key ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tamper", ["other-key", "no-signature", "eos-edited"])
def test_trusted_key_refuses_tampered_bundles_in_load(bundle, keys, tamper):
    (priv, pub), (other, _) = keys
    m = manifest_of(bundle)
    rewrite(bundle, m, key=priv)
    assert greedy(bundle, key=str(pub))
    if tamper == "other-key":
        rewrite(bundle, m, key=other)
    elif tamper == "no-signature":
        (bundle / "manifest.sig").unlink()
    else:
        (bundle / "manifest.json").write_bytes(dumps_manifest(dict(m, tokenizer=dict(m["tokenizer"], eos_token_ids=[5]))))
    with pytest.raises(BundleIntegrityError):
        edge_sdk.load(bundle, key=str(pub), **CPU)


def test_missing_key_file_is_one_line(bundle, tmp_path):
    with pytest.raises(BundleError, match="cannot read the trusted key"):
        verify_bundle(bundle, tmp_path / "nope.pub")


def test_serve_takes_the_trusted_key(bundle, keys, tmp_path, capsys):
    from edge_sdk.cli.main import main
    from edge_sdk.runtime.server.config import load_config
    from edge_sdk.runtime.server.daemon import load_bundle_model

    (_, pub), _ = keys
    assert main(["serve", "--bundle", str(bundle), "--key", str(pub), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle_key"] == str(pub)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'bundle = "{bundle}"\nbundle_key = "{pub}"\n')
    with pytest.raises(BundleIntegrityError, match="manifest.sig is missing"):  # the bundle is unsigned
        load_bundle_model(load_config(cfg))


def test_device_install_config_requires_a_key(tmp_path):
    from edge_sdk.runtime.server.config import load_config
    from edge_sdk.runtime.server.install import install

    install(tmp_path, bundle=str(tmp_path / "b"), reload=False)
    config = load_config(tmp_path / "etc/edge-sdk/edge-sdk.toml")
    assert config.bundle_key == "/etc/edge-sdk/bundle.pub"


def test_run_and_bench_take_the_key():
    from edge_sdk.cli.main import build_parser

    p = build_parser()
    for cmd in ("run", "bench"):
        args = p.parse_args([cmd, "b", "--key", "k.pub"] + (["--prompt", "x"] if cmd == "run" else []))
        assert args.key == "k.pub"


# --- 5. symlinks, special files, files swapped after verification -----------------------------------------------


@pytest.mark.parametrize("name", ["model.weights", "tokenizer.json", "manifest.json", "model.onnx"])
def test_symlinked_file_is_refused(bundle, keys, tmp_path, name):
    (priv, pub), _ = keys
    rewrite(bundle, manifest_of(bundle), key=priv)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(bundle / name, outside / name)
    os.symlink(outside / name, bundle / name)
    with pytest.raises(BundleIntegrityError, match="symlink"):
        verify_bundle(bundle, pub)
    with pytest.raises(BundleIntegrityError, match="symlink"):
        edge_sdk.load(bundle, key=str(pub), **CPU)


def test_symlinked_directory_inside_the_bundle_is_refused(bundle, tmp_path):
    m = manifest_of(bundle)
    (tmp_path / "sub").mkdir()
    shutil.move(bundle / "tokenizer.json", tmp_path / "sub" / "tokenizer.json")
    os.symlink(tmp_path / "sub", bundle / "sub")
    m["files"]["sub/tokenizer.json"] = m["files"].pop("tokenizer.json")
    m["tokenizer"]["files"] = ["sub/tokenizer.json", "tokenizer_config.json"]
    rewrite(bundle, m)
    with pytest.raises(BundleIntegrityError, match="symlink"):
        verify_bundle(bundle)


def test_fifo_is_refused_without_hanging(bundle):
    (bundle / "tokenizer_config.json").unlink()
    os.mkfifo(bundle / "tokenizer_config.json")
    with pytest.raises(BundleIntegrityError, match="not a regular file"):
        verify_bundle(bundle)


def test_files_are_read_through_the_verified_descriptors(bundle):
    from edge_sdk.runtime.backends.fused import EmbeddingRows
    import numpy as np

    m = verify_bundle(bundle)
    original = (bundle / "model.weights").read_bytes()
    swapped = bundle / "swapped"
    swapped.write_bytes(bytes(len(original)))
    os.replace(swapped, bundle / "model.weights")  # same name, other inode, all zeros
    rows = EmbeddingRows(bundle, m)(np.array([[1, 2, 3]]))
    assert np.abs(rows).sum() > 0  # the verified bytes, not the zeros
    with pytest.raises(BundleIntegrityError, match="changed after verification"):
        m.check_unchanged()


# --- 6. every path the runtime opens is a hashed entry; unlisted files refused ------------------------------------


@pytest.mark.parametrize("extra", ["extra.bin", "sub/model.onnx"])
def test_unlisted_file_is_refused(bundle, keys, extra):
    (priv, pub), _ = keys
    rewrite(bundle, manifest_of(bundle), key=priv)
    (bundle / extra).parent.mkdir(exist_ok=True)
    (bundle / extra).write_bytes(b"x")
    with pytest.raises(BundleIntegrityError, match="not listed"):
        verify_bundle(bundle, pub)


def test_engine_cache_inside_the_bundle_is_not_a_bundle_file(bundle):
    (bundle / ".edge-sdk-engines" / "ort-fused").mkdir(parents=True)
    (bundle / ".edge-sdk-engines" / "ort-fused" / "x").write_bytes(b"x")
    assert verify_bundle(bundle)["files"]


def test_graph_outside_the_bundle_is_never_run(bundle, keys, tmp_path):
    (priv, pub), _ = keys
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(bundle / "model.onnx", outside / "model.onnx")
    m = manifest_of(bundle)
    m["graphs"]["fp32"]["file"] = "../outside/model.onnx"
    rewrite(bundle, m, key=priv)
    with pytest.raises(BundleError, match="graphs.fp32.file"):
        edge_sdk.load(bundle, key=str(pub), graph="standard", **CPU)


# --- 7. caches bound to the bundle by hash ---------------------------------------------------------------------


def test_flipped_fused_cache_bytes_are_rebuilt(bundle, caplog):
    first = greedy(bundle, graph="fused")
    [weights] = (bundle.parent / ".edge-sdk-engines").glob("ort-fused/*/fused.weights")
    data = bytearray(weights.read_bytes())
    for i in range(64):
        data[len(data) // 3 + i * 97] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="edge_sdk.runtime"):
        assert greedy(bundle, graph="fused") == first
    assert any("sha256" in r.getMessage() for r in caplog.records)
    assert weights.read_bytes() != bytes(data)


def test_flipped_fused_graph_bytes_are_rebuilt(bundle):
    first = greedy(bundle, graph="fused")
    [graph] = (bundle.parent / ".edge-sdk-engines").glob("ort-fused/*/fused-level1.onnx")
    good = graph.read_bytes()
    graph.write_bytes(good[:-8] + b"\0" * 8)
    assert greedy(bundle, graph="fused") == first
    assert graph.read_bytes() == good


def test_tensorrt_engine_cache_checks_its_hash(tmp_path, caplog):
    from edge_sdk.runtime.backends import engine_cache as ec

    key = ec.EngineKey("agx-orin-64gb", "10.3", "a" * 64)
    path = ec.write_entry(tmp_path, key, b"engine" * 100, {})
    assert ec.lookup(tmp_path, key) == path
    path.write_bytes(b"Engine" + b"engine" * 99)
    with caplog.at_level(logging.WARNING, logger="edge_sdk.runtime"):
        assert ec.lookup(tmp_path, key) is None
        assert ec.lookup_bundle(tmp_path, "agx-orin-64gb", "10.3", "a" * 64) is None
    assert any("sha256" in r.getMessage() for r in caplog.records)


# --- 8. partial bundles --------------------------------------------------------------------------------------


def test_partial_bundle_never_verifies_and_is_cleaned_up(bundle, keys, tmp_path):
    (priv, pub), _ = keys
    rewrite(bundle, manifest_of(bundle), key=priv)
    partial = tmp_path / ".out.partial-abc123"
    shutil.copytree(bundle, partial)  # what a kill after staging leaves
    with pytest.raises(BundleError, match="partial"):
        verify_bundle(partial, pub)
    r = subprocess.run([sys.executable, "-m", "edge_sdk.cli.main", "verify", str(partial), "--key", str(pub)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with staged_directory(tmp_path / "out") as d:
        (d / "f").write_text("x")
    assert not partial.exists() and (tmp_path / "out" / "f").exists()


def test_a_running_writer_keeps_its_partial(tmp_path):
    with staged_directory(tmp_path / "out") as d:
        (d / "f").write_text("x")
        with staged_directory(tmp_path / "out", overwrite=True) as d2:
            (d2 / "f").write_text("y")
        assert d.exists()  # this process is alive: its staging directory is not stale


# --- plan with a bad manifest ------------------------------------------------------------------------------------


def test_plan_with_a_truncated_manifest_is_one_line(bundle):
    data = (bundle / "manifest.json").read_bytes()
    (bundle / "manifest.json").write_bytes(data[: len(data) // 2])
    r = subprocess.run([sys.executable, "-m", "edge_sdk.cli.main", "plan", str(bundle), "--board", "orin-nano-8gb"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
