"""Test doubles for fleet updates: signed toy bundles and an http.server that honours Range and can cut a transfer."""

from __future__ import annotations

import http.server
import os
import re
import threading
from functools import partial
from pathlib import Path

from edge_sdk.bundle import generate_keypair, read_manifest, write_manifest
from test_runtime_loader import make_toy_bundle


def keypair(d: Path) -> tuple[Path, Path]:
    return generate_keypair(d)


def signed_bundle(d: Path, key: Path, version: str, boards=None) -> Path:
    make_toy_bundle(d, boards=boards)
    m = {k: v for k, v in read_manifest(d).items() if k not in ("files", "schema_version")}
    write_manifest(d, {**m, "version": version}, key)
    return d


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """GET with `Range: bytes=N-` (206), and an optional cut after `cut_after` body bytes of a file's first full GET."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        log = self.server.requests
        rng = self.headers.get("Range")
        log.append((self.path, rng))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        if start > len(data):
            self.send_error(416)
            return
        body = data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.cut.pop(self.path, None) if not rng else None
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


class BundleServer:
    def __init__(self, directory: Path):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(directory)))
        self.httpd.requests = []
        self.httpd.cut = {}
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def tree_digest(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
