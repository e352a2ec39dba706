"""Bring a release bundle into a staging directory, checking it as the bytes arrive.

Sources: a bundle directory, a tarball (.tar, .tar.gz, .tgz; a local file or an http(s) URL), or
the http(s) URL of a bundle directory (``URL/manifest.json``, ``URL/manifest.sig``, ``URL/<file>``).

The manifest and its signature come first: the signature is checked over the manifest's raw bytes
with the trusted key before any other byte is kept, and from then on every file is held to the size
and sha256 the signed manifest gives (a byte past the size, or a digest that differs, stops it).
HTTP downloads resume with a Range request after an interruption: the bytes already on disk are
hashed again and the rest is asked for. The staging directory is still checked whole by
``verify_bundle`` before it is installed; this module never decides that a bundle is good.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from edge_sdk.bundle import SIGNATURE_MAX_BYTES, verify_signature
from edge_sdk.errors import BundleError, BundleIntegrityError
from edge_sdk.fsutil import UnsafeFileError, fsync_path, open_regular
from edge_sdk.manifest import MANIFEST, MANIFEST_MAX_BYTES, SIGNATURE, parse_manifest

CHUNK = 1 << 16
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TARBALL_MAX_BYTES = 1 << 40
Hook = Callable[[str], None]


@dataclass(frozen=True)
class FetchSettings:
    key: Path  # trusted ed25519 public key
    attempts: int = 5  # HTTP requests per file before giving up
    timeout_s: float = 30.0  # per socket operation
    retry_s: float = 0.5  # first pause between attempts (doubles)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def is_tarball(source: str) -> bool:
    return source.split("?", 1)[0].endswith(TAR_SUFFIXES)


def fetch(source: str, staging: Path, settings: FetchSettings, hook: Hook = lambda step: None) -> dict:
    """Fill `staging` with the bundle at `source`; returns the parsed manifest."""
    staging.mkdir(parents=True, exist_ok=True)
    if is_url(source) and is_tarball(source):
        tarball = staging.with_name(staging.name + ".tar")
        download(source, tarball, None, settings, hook)
        manifest = from_tarball(tarball, staging, settings, hook)
        tarball.unlink(missing_ok=True)
        return manifest
    if is_url(source):
        return from_url(source.rstrip("/"), staging, settings, hook)
    path = Path(source)
    if path.is_dir():
        return from_directory(path, staging, settings, hook)
    if path.is_file() and is_tarball(source):
        return from_tarball(path, staging, settings, hook)
    raise BundleError(f"{source}: not a bundle directory, a tarball or an http(s) URL",
                      hint="pass the directory `edge-sdk convert` wrote, a .tar/.tar.gz of it, or its URL")


def trusted_manifest(data: bytes, signature: bytes, where: str, settings: FetchSettings) -> dict:
    if len(data) > MANIFEST_MAX_BYTES or len(signature) > SIGNATURE_MAX_BYTES:
        raise BundleIntegrityError(f"{where}: manifest or signature too large", hint="the update is corrupt: publish it again")
    verify_signature(data, signature, settings.key)
    return parse_manifest(data, f"{where}/{MANIFEST}")


def _write_small(staging: Path, name: str, data: bytes) -> None:
    tmp = staging / f".{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, staging / name)


def _keep_manifest(staging: Path, data: bytes, signature: bytes) -> None:
    """A staging directory holds the manifest of one update only: another's partial files go."""
    old = staging / MANIFEST
    if old.is_file() and old.read_bytes() != data:
        for p in sorted(staging.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
    _write_small(staging, SIGNATURE, signature)
    _write_small(staging, MANIFEST, data)


# --- receiving one file ----------------------------------------------------------------------


class Receiver:
    """One listed file arriving in order: size and sha256 checked as bytes come, resumable from disk."""

    def __init__(self, staging: Path, rel: str, meta: dict, hook: Hook):
        self.rel, self.size, self.sha256 = rel, meta["size"], meta["sha256"]
        self.path = staging / rel
        self.hook = hook
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise BundleIntegrityError(f"staging {self.path} is not a regular file", hint="remove the staging directory and update again")
        self.h = hashlib.sha256()
        self.have = 0
        if self.path.exists():
            if self.path.stat().st_size > self.size:
                self.path.unlink()
            else:
                with open(self.path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        self.h.update(chunk)
                        self.have += len(chunk)

    @property
    def complete(self) -> bool:
        return self.have == self.size

    def write(self, chunks: Iterator[bytes]) -> None:
        with open(self.path, "ab") as f:
            for chunk in chunks:
                if self.have + len(chunk) > self.size:
                    raise BundleIntegrityError(f"{self.rel}: more than the {self.size} bytes the manifest lists",
                                               hint="the update source is corrupt: publish the bundle again")
                f.write(chunk)
                f.flush()
                self.h.update(chunk)
                self.have += len(chunk)
                self.hook("download-chunk")
            os.fsync(f.fileno())

    def finish(self) -> None:
        if self.have != self.size:
            raise BundleIntegrityError(f"{self.rel}: truncated, {self.have} of {self.size} bytes arrived",
                                       hint="the download was cut: run the update again, it resumes")
        if self.h.hexdigest() != self.sha256:
            self.path.unlink()
            raise BundleIntegrityError(f"{self.rel}: fails its sha256 check as downloaded",
                                       hint="the update source is corrupt or tampered with: publish the bundle again")


# --- a bundle directory ------------------------------------------------------------------------


def _read_fd(fd: int, cap: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        return f.read(cap + 1)


def from_directory(src: Path, staging: Path, settings: FetchSettings, hook: Hook) -> dict:
    try:
        data = _read_fd(open_regular(src, MANIFEST), MANIFEST_MAX_BYTES)
        signature = _read_fd(open_regular(src, SIGNATURE), SIGNATURE_MAX_BYTES)
    except UnsafeFileError as exc:
        raise BundleError(f"{src}: {exc}", hint="an update needs a signed bundle (manifest.json and manifest.sig)") from None
    manifest = trusted_manifest(data, signature, str(src), settings)
    _keep_manifest(staging, data, signature)
    for rel, meta in manifest["files"].items():
        r = Receiver(staging, rel, meta, hook)
        if not r.complete:
            try:
                fd = open_regular(src, rel)
            except UnsafeFileError as exc:
                raise BundleIntegrityError(f"{src}: {exc}", hint="copy the bundle again") from None
            with os.fdopen(fd, "rb") as f:
                f.seek(r.have)
                r.write(iter(lambda: f.read(CHUNK), b""))
        r.finish()
    return manifest


# --- a tarball -----------------------------------------------------------------------------------


def _member_name(m: tarfile.TarInfo) -> str:
    name = m.name[2:] if m.name.startswith("./") else m.name
    return name.rstrip("/")


def _strip_top(names: list[str]) -> str:
    """A tarball of the bundle directory itself has one top folder: its files are under it."""
    if MANIFEST in names:
        return ""
    tops = {n.split("/", 1)[0] for n in names if n}
    return next(iter(tops)) + "/" if len(tops) == 1 else ""


def from_tarball(path: Path, staging: Path, settings: FetchSettings, hook: Hook) -> dict:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            prefix = _strip_top([_member_name(m) for m in members])
            by_name = {_member_name(m)[len(prefix):]: m for m in members if _member_name(m).startswith(prefix)}
            data = _tar_small(tar, by_name, MANIFEST, MANIFEST_MAX_BYTES, path)
            signature = _tar_small(tar, by_name, SIGNATURE, SIGNATURE_MAX_BYTES, path)
            manifest = trusted_manifest(data, signature, str(path), settings)
            _keep_manifest(staging, data, signature)
            _refuse_unlisted_members(by_name, manifest["files"], path)
            for rel, meta in manifest["files"].items():
                m = by_name.get(rel)
                if m is None or not m.isreg():
                    raise BundleIntegrityError(f"{path}: {rel} is {'missing' if m is None else 'not a regular file'}",
                                               hint="the tarball is incomplete: publish the bundle again")
                r = Receiver(staging, rel, meta, hook)
                if not r.complete:
                    f = tar.extractfile(m)
                    f.seek(r.have)
                    r.write(iter(lambda: f.read(CHUNK), b""))
                r.finish()
            return manifest
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleIntegrityError(f"{path}: not a readable tarball ({exc})", hint="the download is truncated or corrupt: run the update again") from None


def _tar_small(tar: tarfile.TarFile, by_name: dict, name: str, cap: int, path: Path) -> bytes:
    m = by_name.get(name)
    if m is None or not m.isreg() or m.size > cap:
        raise BundleError(f"{path}: {name} is missing or not a small regular file", hint="an update needs a signed bundle (manifest.json and manifest.sig)")
    return tar.extractfile(m).read()


def _refuse_unlisted_members(by_name: dict, files: dict, path: Path) -> None:
    parents = {"/".join(rel.split("/")[:i]) for rel in files for i in range(1, rel.count("/") + 1)}
    for name, m in by_name.items():
        if not name or name in (MANIFEST, SIGNATURE) or (m.isdir() and name in parents):
            continue
        if name not in files or not m.isreg():
            raise BundleIntegrityError(f"{path}: {name} is {'not listed in the manifest' if name not in files else 'not a regular file'}",
                                       hint="a bundle holds only the regular files its manifest hashes: publish it again")


# --- HTTP ----------------------------------------------------------------------------------------


def _get(url: str, offset: int, settings: FetchSettings):
    req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    return urllib.request.urlopen(req, timeout=settings.timeout_s)  # noqa: S310 (http/https only: is_url)


def _http_small(url: str, cap: int, settings: FetchSettings) -> bytes:
    last = None
    for attempt in range(settings.attempts):
        try:
            with _get(url, 0, settings) as resp:
                data = resp.read(cap + 1)
            if len(data) > cap:
                raise BundleIntegrityError(f"{url}: larger than {cap:,} bytes", hint="the update source is not a bundle")
            return data
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise BundleError(f"{url}: not found (404)", hint="an update needs a signed bundle (manifest.json and manifest.sig)") from None
            last = exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            last = exc
        time.sleep(settings.retry_s * 2 ** attempt)
    raise BundleError(f"{url}: cannot be fetched ({last})", hint="check the URL and the network, then run the update again")


def _body(resp, offset: int) -> Iterator[bytes]:
    if offset and resp.status != 206:
        raise _RangeIgnored()
    while chunk := resp.read(CHUNK):
        yield chunk


class _RangeIgnored(Exception):
    pass


def download(url: str, path: Path, receiver: Receiver | None, settings: FetchSettings, hook: Hook) -> None:
    """GET url into path (or through a Receiver), resuming with Range after a cut connection."""
    last = None
    for attempt in range(settings.attempts):
        have = receiver.have if receiver else (path.stat().st_size if path.exists() else 0)
        if receiver and receiver.complete:
            return
        try:
            with _get(url, have, settings) as resp:
                if receiver:
                    receiver.write(_body(resp, have))
                    if receiver.complete:
                        return
                else:
                    _append(path, _body(resp, have), hook)
                    return
        except _RangeIgnored:
            if receiver:
                receiver.path.unlink()
                receiver.h, receiver.have = hashlib.sha256(), 0
            else:
                path.unlink()
            last = "the server ignored the Range request"
            continue
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise BundleError(f"{url}: not found (404)", hint="the update source is incomplete: publish the bundle again") from None
            if exc.code == 416 and receiver is None:
                path.unlink(missing_ok=True)  # past the end of a file that changed: start again
            last = exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # a cut connection: resume
            last = exc
        time.sleep(settings.retry_s * 2 ** attempt)
    if receiver is None:
        raise BundleError(f"{url}: download failed after {settings.attempts} attempts ({last})",
                          hint="check the network, then run the update again: it resumes")


def _append(path: Path, chunks: Iterator[bytes], hook: Hook) -> None:
    with open(path, "ab") as f:
        for chunk in chunks:
            if f.tell() + len(chunk) > TARBALL_MAX_BYTES:
                raise BundleIntegrityError(f"{path}: larger than {TARBALL_MAX_BYTES:,} bytes", hint="the update source is not a bundle")
            f.write(chunk)
            f.flush()
            hook("download-chunk")
        os.fsync(f.fileno())


def from_url(base: str, staging: Path, settings: FetchSettings, hook: Hook) -> dict:
    data = _http_small(f"{base}/{MANIFEST}", MANIFEST_MAX_BYTES, settings)
    signature = _http_small(f"{base}/{SIGNATURE}", SIGNATURE_MAX_BYTES, settings)
    manifest = trusted_manifest(data, signature, base, settings)
    _keep_manifest(staging, data, signature)
    for rel, meta in manifest["files"].items():
        r = Receiver(staging, rel, meta, hook)
        download(f"{base}/{urllib.request.quote(rel)}", r.path, r, settings, hook)
        r.finish()
    fsync_path(staging)
    return manifest
