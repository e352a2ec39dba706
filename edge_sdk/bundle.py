"""Release bundle format: manifest, per-file sha256, optional ed25519 signature, atomic writing.

A bundle is a directory::

    manifest.json        schema version, source, architecture, quantization, graphs, KV layout,
                         tokenizer, accuracy report, and {path: {sha256, size}} of every other file
    manifest.sig         optional ed25519 signature over the exact bytes of manifest.json
    model.onnx ...       graphs, one external weights file, tokenizer files

Nothing in a bundle is trusted before ``verify_bundle`` has checked it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import BundleError, BundleIntegrityError, require
from .fsutil import fsync_path

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dumps_manifest(manifest: dict) -> bytes:
    """Canonical bytes: sorted keys, fixed indent, trailing newline (same input, same bytes)."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def hash_files(root: Path) -> dict[str, dict]:
    """{relative path: {sha256, size}} of every file under root except the manifest and its signature."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in (MANIFEST, SIGNATURE):
            out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def write_manifest(root: Path, manifest: dict, sign_key: str | Path | None = None) -> dict:
    """Fill in schema version and file hashes, write manifest.json (and manifest.sig when a key is given)."""
    manifest = dict(manifest, schema_version=SCHEMA_VERSION, files=hash_files(root))
    data = dumps_manifest(manifest)
    (root / MANIFEST).write_bytes(data)
    if sign_key is not None:
        (root / SIGNATURE).write_bytes(sign(data, sign_key))
    return manifest


def read_manifest(bundle: str | Path) -> dict:
    root = Path(bundle)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory", hint="pass the directory written by `edge-sdk convert`")
    if not path.exists():
        raise BundleError(f"{root}: no {MANIFEST}", hint="a bundle is written by `edge-sdk convert`; an interrupted conversion leaves none")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleIntegrityError(f"{path}: manifest is not valid JSON ({exc})", hint="the bundle is corrupt: copy it again") from exc
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise BundleError(f"{path}: no schema_version", hint="not an edge-sdk bundle")
    if version > SCHEMA_VERSION:
        raise BundleError(f"{root}: bundle schema {version} is newer than this runtime understands ({SCHEMA_VERSION})",
                          hint="upgrade edge-sdk on this device")
    return manifest


def verify_bundle(bundle: str | Path, public_key: str | Path | None = None, *, require_signature: bool = False) -> dict:
    """Check signature (when a key is given) and every file's size and sha256; return the manifest."""
    root = Path(bundle)
    manifest = read_manifest(root)
    sig = root / SIGNATURE
    if public_key is not None or require_signature:
        if not sig.exists():
            raise BundleIntegrityError(f"{root}: {SIGNATURE} is missing but a trusted key is configured",
                                       hint="convert with --sign-key, or configure no key to skip signature checks")
        verify_signature((root / MANIFEST).read_bytes(), sig.read_bytes(), public_key)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleIntegrityError(f"{root}/{MANIFEST}: lists no files")
    for rel, meta in files.items():
        p = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise BundleIntegrityError(f"{root}: manifest names a path outside the bundle: {rel}")
        if not p.is_file():
            raise BundleIntegrityError(f"{root}: {rel} is missing", hint="the bundle is incomplete: copy it again")
        size = p.stat().st_size
        if size != meta["size"]:
            raise BundleIntegrityError(f"{root}: {rel} has {size} bytes, manifest says {meta['size']}",
                                       hint="the file is truncated or replaced: copy the bundle again")
        if sha256_file(p) != meta["sha256"]:
            raise BundleIntegrityError(f"{root}: {rel} fails its sha256 check", hint="the file is corrupt or tampered with: copy the bundle again")
    return manifest


# --- ed25519 ---------------------------------------------------------------------------------


def _load_key(path: str | Path, private: bool):
    ser = require("cryptography.hazmat.primitives.serialization", "runtime")
    ed = require("cryptography.hazmat.primitives.asymmetric.ed25519", "runtime")
    data = Path(path).read_bytes()
    try:
        if data.startswith(b"-----BEGIN"):
            return ser.load_pem_private_key(data, None) if private else ser.load_pem_public_key(data)
        raw = bytes.fromhex(data.decode().strip()) if len(data) in (64, 65) else data
        cls = ed.Ed25519PrivateKey if private else ed.Ed25519PublicKey
        return cls.from_private_bytes(raw) if private else cls.from_public_bytes(raw)
    except ValueError as exc:
        kind = "private" if private else "public"
        raise BundleError(f"{path}: not an ed25519 {kind} key ({exc})", hint="create a key pair with `edge-sdk verify --keygen DIR`") from exc


def sign(data: bytes, private_key: str | Path) -> bytes:
    return _load_key(private_key, private=True).sign(data)


def verify_signature(data: bytes, signature: bytes, public_key: str | Path | None) -> None:
    if public_key is None:
        raise BundleIntegrityError("a signature check needs a public key", hint="pass --key PUBLIC_KEY")
    exc_mod = require("cryptography.exceptions", "runtime")
    try:
        _load_key(public_key, private=False).verify(signature, data)
    except exc_mod.InvalidSignature as exc:
        raise BundleIntegrityError(f"{MANIFEST}: signature does not match the trusted key {public_key}",
                                   hint="the bundle was modified or signed by another key: do not deploy it") from exc


def generate_keypair(directory: str | Path) -> tuple[Path, Path]:
    """Write signing.key (PEM, private, mode 0600) and signing.pub (PEM) into directory."""
    ser = require("cryptography.hazmat.primitives.serialization", "runtime")
    ed = require("cryptography.hazmat.primitives.asymmetric.ed25519", "runtime")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ed.Ed25519PrivateKey.generate()
    priv, pub = d / "signing.key", d / "signing.pub"
    priv.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    os.chmod(priv, 0o600)
    pub.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


# --- atomic writing ----------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for p in [*root.rglob("*"), root]:
        fsync_path(p)


@contextmanager
def staged_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync it and rename it to `target`.

    A crash or kill before the rename leaves only a `.NAME.partial-*` directory (never something
    that looks like a bundle); an exception removes it.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise BundleError(f"{target} already exists", hint="choose another output or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- what the bundle stores, for the planner ---------------------------------------------------


def bundle_quant_fields(model) -> dict | None:
    """QuantSpec fields recorded in a bundle's manifest (None when `model` is not a bundle directory),
    so that `edge-sdk plan BUNDLE` sizes exactly what the converter wrote."""
    root = Path(str(model)) if isinstance(model, (str, Path)) else None
    if root is None or not (root / MANIFEST).is_file():
        return None
    q = read_manifest(root).get("quantization") or {}
    fields = {"bits": q.get("bits"), "group_size": q.get("group_size"), "scale_dtype": q.get("scale_dtype"),
              "embed_dtype": q.get("embed_dtype"), "lm_head_dtype": q.get("lm_head_dtype"), "other_dtype": q.get("other_dtype")}
    return {k: v for k, v in fields.items() if v is not None}
