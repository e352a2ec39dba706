"""Engine cache beside the bundle: TensorRT engines and timing caches built on the device.

An engine is valid only for one GPU (board), one TensorRT version and one bundle (+ build
settings), so all of them are in the key; a lookup that finds metadata for another key treats the
entry as stale. Engines are never part of the release bundle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_sdk.bundle import MANIFEST, sha256_file

log = logging.getLogger("edge_sdk.runtime")

METADATA = "engine.json"
ENGINE = "engine.plan"
TIMING_CACHE = "timing.cache"


def bundle_hash(bundle: str | Path) -> str:
    """sha256 of manifest.json: it lists every file's sha256, so it identifies the whole bundle."""
    return hashlib.sha256((Path(bundle) / MANIFEST).read_bytes()).hexdigest()


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", part)


@dataclass(frozen=True)
class EngineKey:
    board: str
    tensorrt_version: str
    bundle_hash: str
    settings_hash: str = ""  # hash of build settings (profiles, precision, workspace)

    def directory(self, root: Path) -> Path:
        leaf = self.bundle_hash[:16] + (f"-{self.settings_hash[:8]}" if self.settings_hash else "")
        return Path(root) / _safe(self.board) / f"trt-{_safe(self.tensorrt_version)}" / leaf

    def timing_cache(self, root: Path) -> Path:
        # timing results depend on GPU and TensorRT version, not on the bundle: shared across bundles
        return Path(root) / _safe(self.board) / f"trt-{_safe(self.tensorrt_version)}" / TIMING_CACHE


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def lookup(root: Path, key: EngineKey) -> Path | None:
    """The cached engine for `key`, or None when absent, incomplete or built for another key."""
    d = key.directory(root)
    meta_path, engine = d / METADATA, d / ENGINE
    if not (meta_path.is_file() and engine.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != asdict(key) or meta.get("engine_bytes") != engine.stat().st_size:
        return None
    if sha256_file(engine) != meta.get("engine_sha256"):  # the key above binds it to the bundle's manifest hash
        log.warning("TensorRT engine cache %s fails its sha256 check: rebuild it with `edge-sdk engine build`", engine)
        return None
    return engine


def lookup_bundle(root: Path, board: str, tensorrt_version: str, bundle_hash: str) -> Path | None:
    """The newest valid engine for this board, TensorRT and bundle, whatever settings it was built with."""
    parent = EngineKey(board, tensorrt_version, bundle_hash).directory(root).parent
    found = []
    for meta_path in parent.glob(f"{bundle_hash[:16]}*/{METADATA}"):
        try:
            key = EngineKey(**json.loads(meta_path.read_text())["key"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        engine = lookup(root, key) if key.bundle_hash == bundle_hash else None
        if engine:
            found.append(engine)
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def write_entry(root: Path, key: EngineKey, engine_bytes: bytes, metadata: dict) -> Path:
    """Write engine + metadata into a temporary sibling directory, fsync, then rename into place."""
    from edge_sdk.bundle import staged_directory

    d = key.directory(root)
    with staged_directory(d, overwrite=True) as tmp:  # fsynced, then renamed into place
        meta = dict(metadata, key=asdict(key), engine_bytes=len(engine_bytes), engine_sha256=hashlib.sha256(engine_bytes).hexdigest())
        (tmp / ENGINE).write_bytes(engine_bytes)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return d / ENGINE


def write_atomic(path: Path, data: bytes) -> None:
    """Replace one file atomically (timing cache): write a sibling, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prune(root: Path, keep: EngineKey) -> list[Path]:
    """Remove engines of other bundles/settings for the same board and TensorRT version."""
    parent = keep.directory(root).parent
    removed = []
    if parent.is_dir():
        for d in parent.iterdir():
            if d.is_dir() and d != keep.directory(root):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed
