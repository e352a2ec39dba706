"""The work directory of a conversion: per-layer results with their sha256, written so that a kill
at any moment leaves only whole files (temp file, fsync, rename, fsync of the directory).

Layout: work.json (what the results belong to: source hashes and quantization settings),
layer-NNNN.safetensors + layer-NNNN.sha256 (int4 integers and fp16 scales of one decoder layer),
acts-NNNN.safetensors + .sha256 (calibration activations after layer NNNN: the next layer's input).
A result whose hash does not match is removed and recomputed, never reused.
library-output.log: what the libraries print while converting (thirdparty_log), kept here until the
conversion finishes, so a failed or killed run leaves it beside its results and a resumed run appends.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

from edge_sdk.errors import ConversionError

LIBRARY_LOG = "library-output.log"
KILL_AFTER_ENV = "EDGE_SDK_CONVERT_KILL_AFTER_LAYER"  # test hook: SIGKILL this process after layer N is saved


def disk_full(path: Path, exc: OSError) -> ConversionError:
    return ConversionError(f"{path}: no space left on the device while writing ({exc.strerror})",
                           hint="free disk space (or pass --work-dir on a larger disk) and run the same command again: "
                                "finished layers are kept")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, exc) from exc
        raise


class WorkDir:
    def __init__(self, path: str | Path, identity: dict):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConversionError(f"{self.path}: cannot create the work directory ({exc.strerror})",
                                  hint="pass --work-dir on a writable disk") from exc
        state = self.path / "work.json"
        text = json.dumps(identity, sort_keys=True, indent=1)
        if state.exists() and state.read_text() != text:
            raise ConversionError(f"{self.path}: holds results of another conversion (other source or settings)",
                                  hint="remove the directory, or pass another --work-dir")
        if not state.exists():
            write_atomic(state, text.encode())

    def _file(self, kind: str, i: int) -> Path:
        return self.path / f"{kind}-{i:04d}.safetensors"

    def save(self, kind: str, i: int, tensors: dict) -> None:
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in tensors.items()})
        f = self._file(kind, i)
        write_atomic(f, data)
        write_atomic(f.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())

    def load(self, kind: str, i: int) -> dict | None:
        """The saved tensors, or None when absent or not whole (then the files are removed)."""
        from safetensors.torch import load

        f, h = self._file(kind, i), self._file(kind, i).with_suffix(".sha256")
        if not (f.exists() and h.exists()):
            return None
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != h.read_text().strip():
            f.unlink(missing_ok=True)
            h.unlink(missing_ok=True)
            return None
        return load(data)

    def has(self, kind: str, i: int) -> bool:
        return self.load(kind, i) is not None

    def drop(self, kind: str, i: int) -> None:
        for f in (self._file(kind, i), self._file(kind, i).with_suffix(".sha256")):
            f.unlink(missing_ok=True)

    def first_missing_layer(self, num_layers: int) -> int:
        i = 0
        while i < num_layers and self.has("layer", i):
            i += 1
        return i


def maybe_kill(layer: int) -> None:
    """Deterministic crash for the resume test: EDGE_SDK_CONVERT_KILL_AFTER_LAYER=N kills after layer N."""
    v = os.environ.get(KILL_AFTER_ENV)
    if v is not None and v.strip() == str(layer):
        os.kill(os.getpid(), signal.SIGKILL)


def default_work_dir(output) -> Path:
    out = Path(output).absolute()
    return out.with_name(out.name + ".work")


def remove_work_dir(path: Path) -> None:
    """Everything but the library log, which is still open (the pipeline moves it when the run ends)."""
    path = Path(path)
    for p in (path.iterdir() if path.is_dir() else ()):
        if p.name != LIBRARY_LOG:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass
