"""The fused graph's entry in the engine cache: keyed by the bundle and onnxruntime, built once under a lock,
its sidecar and graph checked against their recorded sha256 on every load, older entries of the same bundle pruned."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from edge_sdk.errors import require
from edge_sdk.bundle import sha256_file

from ..engine_cache import write_atomic

from .graph import BUILDER_VERSION, GRAPH_NAME, METADATA, WEIGHTS_NAME, Shape, build_graph
from .weights import build_weights, has_qkv_bias

log = logging.getLogger("edge_sdk.runtime")


def key(bundle_hash: str, ort_version: str) -> str:
    return hashlib.sha256(f"{bundle_hash}:{ort_version}:{BUILDER_VERSION}".encode()).hexdigest()[:16]


def ensure(bundle: Path, manifest: dict, bundle_hash: str, cache_root: Path, accuracy_level: int, max_positions: int) -> Path:
    """Path of the fused graph for this bundle and accuracy level, built into the cache when missing."""
    import fcntl

    ort = require("onnxruntime", "runtime")
    root = Path(cache_root) / "ort-fused"
    d = root / key(bundle_hash, ort.__version__)
    meta = d / METADATA
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as lock:
        # one builder at a time (a daemon and a CLI loading the same bundle): the second one waits and
        # finds the entry built
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _valid(d, bundle_hash, max_positions):
            log.info("building the fused CPU graph for %s (once per bundle and onnxruntime version) in %s", Path(bundle).name, d)
            build_weights(Path(bundle), manifest, d, bundle_hash, max_positions)
            prune(Path(cache_root), Path(bundle), keep=d)
        graph = d / GRAPH_NAME.format(level=accuracy_level)
        if not _graph_valid(graph, bundle_hash):
            model = build_graph(Shape.from_manifest(manifest), json.loads(meta.read_text())["tensors"], accuracy_level,
                                qkv_bias=has_qkv_bias(manifest))
            data = model.SerializeToString(deterministic=True)
            write_atomic(graph, data)
            write_atomic(_graph_hash_path(graph), json.dumps({"bundle_hash": bundle_hash, "sha256": hashlib.sha256(data).hexdigest()}).encode())
    return graph


def _graph_hash_path(graph: Path) -> Path:
    return graph.with_name(graph.name + ".sha256")


def _graph_valid(graph: Path, bundle_hash: str) -> bool:
    """The cached graph exists and its bytes hash to what was recorded for this bundle when it was written."""
    try:
        rec = json.loads(_graph_hash_path(graph).read_text())
        ok = graph.is_file() and rec.get("bundle_hash") == bundle_hash
    except (OSError, ValueError, AttributeError):
        return False
    if ok and sha256_file(graph) != rec.get("sha256"):
        log.warning("fused graph cache %s fails its sha256 check: rebuilding it", graph)
        return False
    return ok


def prune(cache_root: Path, bundle: Path, keep: Path) -> list[Path]:
    """Remove fused entries built earlier for the same bundle directory (another version of it)."""
    removed = []
    here = str(Path(bundle).absolute())
    for meta in (Path(cache_root) / "ort-fused").glob(f"*/{METADATA}"):
        if meta.parent == keep:
            continue
        try:
            same = json.loads(meta.read_text()).get("bundle_path") == here
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            shutil.rmtree(meta.parent, ignore_errors=True)
            removed.append(meta.parent)
    return removed


def _valid(d: Path, bundle_hash: str, max_positions: int) -> bool:
    try:
        meta = json.loads((d / METADATA).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    w = d / WEIGHTS_NAME
    if not (isinstance(meta, dict) and meta.get("bundle_hash") == bundle_hash and meta.get("builder_version") == BUILDER_VERSION
            and meta.get("max_positions", 0) >= max_positions and w.is_file() and not w.is_symlink()
            and w.stat().st_size == meta.get("weights_bytes") and meta.get("weights_sha256")):
        return False
    if sha256_file(w) != meta["weights_sha256"]:  # bound to the bundle through bundle_hash above
        log.warning("fused graph cache %s fails its sha256 check: rebuilding it", w)
        return False
    return True
