"""The bundle manifest's schema, checked once, in one place, before any field is used.

`parse_manifest(bytes)` returns a dict whose every field the runtime reads has the type it expects,
or raises one `BundleError` naming the field. Paths the runtime opens (graphs, weights, tokenizer
files) must be entries of `files`, which are relative paths inside the bundle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import BundleError, BundleIntegrityError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MANIFEST_MAX_BYTES = 16 << 20  # a 70B model's manifest is well under 1 MiB
MAX_DEPTH = 32  # nesting of JSON containers
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ARCH_INTS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size")


def parse_manifest(data: bytes, where: str | Path = MANIFEST) -> dict:
    """bytes -> a schema-checked manifest, or a BundleError naming the problem (never another exception)."""
    try:
        manifest = json.loads(data, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise _corrupt(where, f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a huge integer
        raise _corrupt(where, f"manifest is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    _check_depth(manifest, where)
    validate(manifest, where)
    return manifest


def validate(m, where: str | Path = MANIFEST) -> None:
    """Raise a BundleError for the first field that does not have the expected type or value."""
    err = _Checker(where)
    err.that(isinstance(m, dict), "the manifest is not a JSON object")
    version = m.get("schema_version")
    err.that(_is_int(version) and version >= 1, "schema_version is missing or not a positive integer", "not an edge-sdk bundle")
    if version > SCHEMA_VERSION:
        raise BundleError(f"{where}: bundle schema {version} is newer than this runtime understands ({SCHEMA_VERSION})",
                          hint="upgrade edge-sdk on this device")
    files = m.get("files")
    err.that(isinstance(files, dict) and files, "files lists no files")
    for rel, meta in files.items():
        err.that(is_bundle_path(rel), f"files names a path outside the bundle or not allowed in it: {rel!r}")
        err.that(isinstance(meta, dict), f"files[{rel!r}] is not an object")
        err.that(isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"]), f"files[{rel!r}].sha256 is not a sha256 hex digest")
        err.that(_is_int(meta.get("size")) and meta["size"] >= 0, f"files[{rel!r}].size is not a byte count")
    for name in ("architecture", "graphs", "io", "tokenizer", "weights", "quantization", "source", "accuracy"):
        err.that(m.get(name) is None or isinstance(m[name], dict), f"{name} is not an object")
    for name in ("format", "created_by"):
        err.that(m.get(name) is None or isinstance(m[name], str), f"{name} is not a string")
    _check_architecture(m.get("architecture") or {}, err)
    for kind, g in (m.get("graphs") or {}).items():
        err.that(isinstance(g, dict), f"graphs.{kind} is not an object")
        err.file(g.get("file"), files, f"graphs.{kind}.file")
    _check_weights(m.get("weights"), files, err)
    _check_tokenizer(m.get("tokenizer"), files, err)


def is_bundle_path(rel) -> bool:
    """A relative POSIX path inside the bundle, no `..`/`.`/empty parts, not the manifest or its signature."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel or rel.startswith("/"):
        return False
    return all(p not in ("", ".", "..") for p in rel.split("/")) and rel not in (MANIFEST, SIGNATURE)


class _Checker:
    def __init__(self, where):
        self.where = where

    def that(self, ok, problem: str, hint: str = "the bundle is corrupt or was not written by `edge-sdk convert`: copy or convert it again"):
        if not ok:
            raise BundleIntegrityError(f"{self.where}: {problem}", hint=hint)

    def file(self, rel, files: dict, field: str) -> None:
        self.that(isinstance(rel, str) and rel in files, f"{field} = {rel!r} is not a file listed (and hashed) in files")


def _check_architecture(a: dict, err: _Checker) -> None:
    for name in _ARCH_INTS:
        err.that(name not in a or (_is_int(a[name]) and a[name] >= 1), f"architecture.{name} is not a positive integer")
    for name in ("rms_norm_eps", "rope_theta", "max_position_embeddings"):
        err.that(a.get(name) is None or _is_number(a[name]), f"architecture.{name} is not a number")


def _check_weights(w, files: dict, err: _Checker) -> None:
    if w is None:
        return
    err.file(w.get("file"), files, "weights.file")
    size = files[w["file"]]["size"]
    tensors = w.get("tensors", {})
    err.that(isinstance(tensors, dict), "weights.tensors is not an object")
    for name, t in tensors.items():
        where = f"weights.tensors[{name!r}]"
        err.that(isinstance(t, dict), f"{where} is not an object")
        for key in ("offset", "nbytes"):
            err.that(_is_int(t.get(key)) and t[key] >= 0, f"{where}.{key} is missing or not a byte count")
        err.that(t["offset"] + t["nbytes"] <= size, f"{where} ends past the end of {w['file']}")
        err.that(isinstance(t.get("dtype"), str), f"{where}.dtype is missing or not a string")
        shape = t.get("shape")
        err.that(isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape), f"{where}.shape is not a list of sizes")
    layers = w.get("layers", [])
    err.that(isinstance(layers, list), "weights.layers is not a list")
    for i, layer in enumerate(layers):
        ok = isinstance(layer, dict) and all(_is_int(layer.get(k)) and layer[k] >= 0 for k in ("index", "offset", "nbytes"))
        err.that(ok and layer["offset"] + layer["nbytes"] <= size, f"weights.layers[{i}] is not an index, offset and nbytes inside {w['file']}")


def _check_tokenizer(t, files: dict, err: _Checker) -> None:
    if t is None:
        return
    names = t.get("files", [])
    err.that(isinstance(names, list), "tokenizer.files is not a list")
    for i, rel in enumerate(names):
        err.file(rel, files, f"tokenizer.files[{i}]")
    eos = t.get("eos_token_ids")
    err.that(eos is None or (isinstance(eos, list) and all(_is_int(e) and e >= 0 for e in eos)), "tokenizer.eos_token_ids is not a list of token ids")
    for key in ("bos_token_id", "pad_token_id"):
        err.that(t.get(key) is None or (_is_int(t[key]) and t[key] >= 0), f"tokenizer.{key} is not a token id")
    err.that(t.get("chat_template") is None or isinstance(t["chat_template"], str), "tokenizer.chat_template is not a string")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("an object repeats a key")
    return out


def _check_depth(obj, where) -> None:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _corrupt(where, f"JSON nested deeper than {MAX_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def _corrupt(where, problem: str) -> BundleIntegrityError:
    return BundleIntegrityError(f"{where}: {problem}", hint="the bundle is corrupt: copy it again")
