"""Third-party output of a conversion goes to one log file; the terminal keeps our progress and result.

The libraries under the pipeline write through every path there is: GPTQModel (logbar) prints its
banner, config dumps and tables to stdout, tokenicer and transformers log through handlers bound to
the original stderr, torch logs `_pytree` deprecations, torchao reports `Failed to load ..._C_mxfp8`
while it is imported, tqdm bars and C code write to file descriptors 1 and 2. Pointing descriptors 1
and 2 at the log file catches all of them; our own progress bar writes to a copy of the terminal's
stderr taken before the switch. Logging configuration a library makes on import (tokenicer calls
logging.basicConfig(level=INFO)) is undone on the way out, so it does not outlive the conversion.

While converting, the log is `library-output.log` in the conversion's work directory (appended to,
so a run resuming a failed or killed one continues it). When the conversion ends well it is moved
(appended) to `<cache>/logs/convert-<UTC time>-<pid>.log` (<cache>: edge_sdk.paths.cache_dir, $EDGE_SDK_CACHE
when set), one file per process, and the work directory goes once empty.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from edge_sdk.paths import cache_dir

from .workdir import LIBRARY_LOG

_process_log: Path | None = None


def default_log_path() -> Path:
    """One log file per process, never in the current directory."""
    global _process_log
    if _process_log is None:
        _process_log = cache_dir() / "logs" / f"convert-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"
    return _process_log


def work_log_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / LIBRARY_LOG


def keep_log(work_log: Path) -> Path:
    """After a finished conversion: append the work directory's log to the process's log under the
    cache, delete it, and remove the work directory if nothing else is left in it."""
    final = default_log_path()
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(work_log, "rb") as src, open(final, "ab") as dst:
        shutil.copyfileobj(src, dst)
    work_log.unlink()
    try:
        work_log.parent.rmdir()
    except OSError:  # results kept (--keep-work, --dry-run): the directory stays
        pass
    return final


@contextmanager
def third_party_output(log_path: str | Path | None = None):
    """Send descriptors 1 and 2 (and so sys.stdout, sys.stderr and every handler on them) to the log;
    yield a text stream on the terminal's stderr for our own progress bar."""
    path = Path(log_path) if log_path else default_log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    _flush()
    try:
        saved = os.dup(1), os.dup(2)
    except OSError:  # no descriptors to redirect (embedded interpreter): leave the streams alone
        yield sys.stderr
        return
    terminal = os.fdopen(os.dup(saved[1]), "w", encoding="utf-8", errors="replace")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            _flush()
            root.handlers[:] = handlers
            root.setLevel(level)
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            terminal.close()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
