"""Release bundle format: manifest, per-file sha256, optional ed25519 signature, atomic writing.

A bundle is a directory::

    manifest.json        schema version, source, architecture, quantization, graphs, KV layout,
                         tokenizer, accuracy report, and {path: {sha256, size}} of every other file
    manifest.sig         optional ed25519 signature over the exact bytes of manifest.json
    model.onnx ...       graphs, one external weights file, tokenizer files

Nothing in a bundle is trusted before ``verify_bundle`` has checked it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import BundleError, BundleIntegrityError, require
from .fsutil import UnsafeFileError, fsync_path, open_regular
from .manifest import MANIFEST, MANIFEST_MAX_BYTES, SCHEMA_VERSION, SIGNATURE, parse_manifest

_CHUNK = 1 << 20
SIGNATURE_MAX_BYTES = 4096
CACHE_DIR = ".edge-sdk-engines"  # written by the runtime beside or inside a bundle; never part of it
_STAGING = re.compile(r"^\..+\.(partial|old)-")


def sha256_file(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def sha256_fd(fd: int) -> str:
    """sha256 of a whole file read through `fd` with pread (the descriptor's offset is untouched)."""
    h, pos = hashlib.sha256(), 0
    while chunk := os.pread(fd, _CHUNK, pos):
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


class VerifiedManifest(dict):
    """A manifest that `verify_bundle` checked, with the sha256 of its bytes and every listed file held
    open: the descriptors that were hashed are the ones the runtime reads through."""

    def __init__(self, manifest: dict, root: Path, digest: str):
        super().__init__(manifest)
        self.root, self.digest = root, digest
        self._fds: dict[str, int] = {}
        self._stats: dict[str, tuple] = {}
        weakref.finalize(self, _close_all, self._fds)

    def _hold(self, rel: str, fd: int) -> None:
        self._fds[rel] = fd
        self._stats[rel] = _identity(os.fstat(fd))

    def fd(self, rel: str) -> int:
        """The verified descriptor of `rel` (a listed file); do not close it."""
        if rel not in self._fds:
            raise BundleIntegrityError(f"{self.root}: {rel} is not a file listed (and hashed) in the manifest")
        return self._fds[rel]

    def path(self, rel: str) -> Path:
        """Path of a listed file, for libraries that open by name; `check_unchanged` after they read it."""
        self.fd(rel)
        return self.root / rel

    def check_unchanged(self) -> None:
        """Raise if a listed file's name now leads to another file, or the file was written since verification."""
        for rel, ident in self._stats.items():
            try:
                fd = open_regular(self.root, rel)
            except UnsafeFileError as exc:
                raise BundleIntegrityError(f"{self.root}: {exc} (it changed after verification)", hint=_TAMPERED) from None
            try:
                now, then = _identity(os.fstat(fd)), _identity(os.fstat(self._fds[rel]))
            finally:
                os.close(fd)
            if now != ident or then != ident:
                raise BundleIntegrityError(f"{self.root}: {rel} changed after verification", hint=_TAMPERED)

    def close(self) -> None:
        _close_all(self._fds)


_TAMPERED = "something is writing into the bundle: stop it, copy the bundle again and verify it"


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _close_all(fds: dict) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _bundle_root(bundle: str | Path) -> Path:
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory", hint="pass the directory written by `edge-sdk convert`")
    if _STAGING.match(root.absolute().name):
        raise BundleError(f"{root}: a partial (staging) directory of an interrupted conversion, not a bundle",
                          hint="convert again; the next conversion into that target removes it")
    return root


def open_bundle_file(root: Path, rel: str) -> int:
    """A descriptor of a regular file inside the bundle; symlinks, FIFOs and devices are refused."""
    try:
        return open_regular(root, rel)
    except UnsafeFileError as exc:
        text = str(exc)
        if rel == MANIFEST and text.endswith("is missing"):
            raise BundleError(f"{root}: no {MANIFEST}", hint="a bundle is written by `edge-sdk convert`; an interrupted conversion leaves none") from None
        hint = "the bundle is incomplete: copy it again" if text.endswith("is missing") else \
            "bundle files must be regular files inside the bundle directory: copy the bundle again (cp -L / rsync -L)"
        raise BundleIntegrityError(f"{root}: {text}", hint=hint) from None


def _read_capped(fd: int, cap: int, where: Path) -> bytes:
    """At most cap bytes; a larger file is refused after reading cap + 1 bytes."""
    parts, left = [], cap + 1
    while left and (chunk := os.read(fd, min(left, _CHUNK))):
        parts.append(chunk)
        left -= len(chunk)
    if not left:
        raise BundleIntegrityError(f"{where}: larger than {cap:,} bytes", hint="the bundle is corrupt: copy it again")
    return b"".join(parts)


def _read_signature(root: Path) -> bytes:
    try:
        fd = open_bundle_file(root, SIGNATURE)
    except BundleIntegrityError as exc:
        if "is missing" in exc.message:
            raise BundleIntegrityError(f"{root}: {SIGNATURE} is missing but a trusted key is configured",
                                       hint="convert with --sign-key, or configure no key to skip signature checks") from None
        raise
    try:
        return _read_capped(fd, SIGNATURE_MAX_BYTES, root / SIGNATURE)
    finally:
        os.close(fd)


def _refuse_unlisted(root: Path, files: dict) -> None:
    """Every file and directory under root is listed (or a parent of one), except the manifest, its
    signature and the runtime's engine cache. Symlinks are refused wherever they are."""
    allowed_dirs = {p for rel in files for p in _parents(rel)}
    stack = [""]
    while stack:
        here = stack.pop()
        with os.scandir(root / here if here else root) as it:
            for e in it:
                rel = f"{here}/{e.name}" if here else e.name
                if rel in (MANIFEST, SIGNATURE, CACHE_DIR):
                    continue
                if e.is_symlink():
                    raise BundleIntegrityError(f"{root}: {rel} is a symlink", hint="bundle files must be regular files inside the bundle directory: copy the bundle again")
                if e.is_dir(follow_symlinks=False) and rel in allowed_dirs:
                    stack.append(rel)
                elif rel not in files:
                    raise BundleIntegrityError(f"{root}: {rel} is not listed in the manifest",
                                               hint="a bundle holds only the files its manifest hashes: remove it, or copy the bundle again")


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _verified_fd(root: Path, rel: str, meta: dict) -> int:
    fd = open_bundle_file(root, rel)
    try:
        size = os.fstat(fd).st_size
        if size != meta["size"]:
            raise BundleIntegrityError(f"{root}: {rel} has {size} bytes, manifest says {meta['size']}",
                                       hint="the file is truncated or replaced: copy the bundle again")
        if sha256_fd(fd) != meta["sha256"]:
            raise BundleIntegrityError(f"{root}: {rel} fails its sha256 check", hint="the file is corrupt or tampered with: copy the bundle again")
    except BaseException:
        os.close(fd)
        raise
    return fd


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
    """The manifest, parsed and schema-checked but not verified (for the planner and for reports)."""
    root = _bundle_root(bundle)
    fd = open_bundle_file(root, MANIFEST)
    try:
        return parse_manifest(_read_capped(fd, MANIFEST_MAX_BYTES, root / MANIFEST), root / MANIFEST)
    finally:
        os.close(fd)


def verify_bundle(bundle: str | Path, public_key: str | Path | None = None, *, require_signature: bool = False) -> "VerifiedManifest":
    """Check the signature over the manifest's raw bytes (when a key is given), then its schema, then that
    the directory holds exactly the listed files, each a regular file whose size and sha256 match.

    The files stay open: the runtime reads them through these descriptors (`VerifiedManifest.fd`)."""
    if public_key is not None:
        _load_key(public_key, private=False)  # a missing or malformed key is named before the bundle
    root = _bundle_root(bundle)
    fd = open_bundle_file(root, MANIFEST)
    try:
        data = _read_capped(fd, MANIFEST_MAX_BYTES, root / MANIFEST)
    finally:
        os.close(fd)
    if public_key is not None or require_signature:
        verify_signature(data, _read_signature(root), public_key)
    manifest = VerifiedManifest(parse_manifest(data, root / MANIFEST), root, hashlib.sha256(data).hexdigest())
    _refuse_unlisted(root, manifest["files"])
    for rel, meta in manifest["files"].items():
        manifest._hold(rel, _verified_fd(root, rel, meta))
    return manifest


# --- ed25519 ---------------------------------------------------------------------------------


def _load_key(path: str | Path, private: bool):
    ser = require("cryptography.hazmat.primitives.serialization", "runtime")
    ed = require("cryptography.hazmat.primitives.asymmetric.ed25519", "runtime")
    kind = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read the {'signing' if private else 'trusted'} key {path} ({exc.strerror})",
                          hint="put the release's public key (signing.pub from `edge-sdk verify --keygen DIR`) there, or pass another with --key") from None
    cls = ed.Ed25519PrivateKey if private else ed.Ed25519PublicKey
    try:
        if data.startswith(b"-----BEGIN"):
            key = ser.load_pem_private_key(data, None) if private else ser.load_pem_public_key(data)
            if not isinstance(key, cls):
                raise ValueError(f"a {type(key).__name__.lstrip('_')}, not ed25519")
            return key
        raw = bytes.fromhex(data.decode().strip()) if len(data) in (64, 65) else data
        return cls.from_private_bytes(raw) if private else cls.from_public_bytes(raw)
    except (ValueError, TypeError) as exc:
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

    A crash or kill before the rename leaves only a `.NAME.partial-PID-*` directory, which never
    verifies and which the next staging into the same target removes once PID is gone; an exception
    removes it at once.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise BundleError(f"{target} already exists", hint="choose another output or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
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


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove `.NAME.partial-PID-*` / `.NAME.old-PID` left beside target by a writer that no longer runs."""
    removed = []
    for p in target.parent.glob(f".{glob.escape(target.name)}.*"):
        m = re.fullmatch(rf"\.{re.escape(target.name)}\.(?:partial|old)-(\d+)?.*", p.name)
        if m and p.is_dir() and not p.is_symlink() and not _alive(m.group(1)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: str | None) -> bool:
    if not pid:
        return False  # written before staging names carried the writer's pid
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


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
