"""One request never stops the daemon: hostile bodies get a 400 in OpenAI's shape, a request whose
sampling fails fails alone, a scheduler that dies anyway shows on /health and stops the watchdog,
and `serve` refuses a busy port before loading anything.

Every request here has a timeout: a hang fails the test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from edge_sdk.runtime.server.config import ServeConfig  # noqa: E402
from edge_sdk.runtime.server.daemon import Daemon, Service, build_service  # noqa: E402
from edge_sdk.runtime.server.engine import SamplingParams  # noqa: E402
from test_server_helpers import FakeStepModel, ServerThread, make_state, reference_completion  # noqa: E402

TIMEOUT_S = 15  # far above any answer here; only a hang reaches it

CASES = {"tried": 0, "handled": 0}  # hand-written HTTP cases (printed with -s)


def post(url: str, body: bytes, count: bool = True) -> tuple[int, dict]:
    """count=False where a 5xx is the expected answer (a scheduler killed on purpose)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    CASES["tried"] += count
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            status, data = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        status, data = e.code, json.loads(e.read())
    CASES["handled"] += count and status < 500
    return status, data


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def still_serves(s) -> None:
    """The daemon answers a normal request correctly and reports itself healthy."""
    status, data = post(s.url + "/v1/completions", json.dumps({"prompt": "again", "max_tokens": 5, "temperature": 0}).encode())
    assert status == 200 and data["choices"][0]["text"] == reference_completion(list(b"again"), 5)[0]
    status, health = get(s.url + "/health")
    assert status == 200 and health["status"] == "ok"
    assert s.state.memory.stats()["kv_blocks_used"] == 0


@pytest.fixture(scope="module")
def server():
    with ServerThread(make_state()) as s:
        yield s


@pytest.fixture(scope="module")
def bundle_server(tmp_path_factory):
    """A real bundle (the runtime's reference graph under onnxruntime) behind the real app."""
    from test_runtime_loader import make_toy_bundle

    d = tmp_path_factory.mktemp("hardening") / "bundle"
    make_toy_bundle(d)
    with ServerThread(build_service(ServeConfig(bundle=str(d), emulate="agx-orin-64gb")).state) as s:
        yield s


def teardown_module():
    print(f"\nhand-written HTTP cases: tried {CASES['tried']}, handled (< 500) {CASES['handled']}, "
          f"failures {CASES['tried'] - CASES['handled']}")


CHAT = '"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'

# each of these stopped the scheduler thread for good: the request and every later one hung
DEADLY = [
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "seed": -1}', "seed"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "seed": -9223372036854775808}', "seed"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "seed": 18446744073709551616}', "seed"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "temperature": NaN}', None),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "top_p": NaN}', None),
    ("/v1/chat/completions", '{' + CHAT + ', "temperature": NaN}', None),
    ("/v1/chat/completions", '{' + CHAT + ', "top_p": -Infinity}', None),
    ("/v1/chat/completions", '{' + CHAT + ', "temperature": 1e400}', "temperature"),  # parses to inf
    ("/v1/chat/completions", '{' + CHAT + ', "seed": -1, "stream": true}', "seed"),
]


@pytest.mark.parametrize("path,body,param", DEADLY)
def test_request_that_stopped_the_scheduler_gets_400_and_the_daemon_keeps_serving(server, path, body, param):
    status, data = post(server.url + path, body.encode())
    assert status == 400 and data["error"]["type"] == "invalid_request_error"
    assert data["error"]["param"] == param
    still_serves(server)


def test_a_request_whose_sampler_fails_fails_alone():
    """Past the HTTP checks (here: straight into the scheduler), bad sampling settings fail only their request."""
    state = make_state()
    state.scheduler.start()

    async def go(s):
        loop = asyncio.get_running_loop()
        bad = s.submit(list(b"hi"), SamplingParams(max_tokens=2, seed=-1), loop)
        ev = await asyncio.wait_for(bad.events.get(), TIMEOUT_S)
        good = s.submit(list(b"again"), SamplingParams(max_tokens=5, temperature=0.0), loop)
        text = []
        while (e := await asyncio.wait_for(good.events.get(), TIMEOUT_S)).kind == "text":
            text.append(e.text)
        return ev, "".join(text), e.finish_reason

    try:
        ev, text, reason = asyncio.run(go(state.scheduler))
    finally:
        state.scheduler.stop()
    assert ev.kind == "error" and "seed" in str(ev.error).lower()
    assert (text, reason) == (reference_completion(list(b"again"), 5)[0], "length")
    assert state.memory.stats()["kv_blocks_used"] == 0 and state.scheduler.failure is None


class Fatal(BaseException):
    """Stands for a failure no request handler can catch."""


def test_a_dead_scheduler_shows_on_health_and_fails_requests_instead_of_hanging():
    model = FakeStepModel()
    model.step = lambda *a: (_ for _ in ()).throw(Fatal("step blew up"))
    with ServerThread(make_state(model)) as s:
        status, data = post(s.url + "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 3}).encode(), count=False)
        assert status == 500 and "scheduler stopped" in data["error"]["message"]
        status, health = get(s.url + "/health")
        assert status == 503 and health["status"] == "failed" and "Fatal: step blew up" in health["error"]
        status, data = post(s.url + "/v1/completions", json.dumps({"prompt": "y", "max_tokens": 3}).encode(), count=False)
        assert status == 503 and "restart the service" in data["error"]["message"]
        with urllib.request.urlopen(s.url + "/metrics", timeout=TIMEOUT_S) as r:
            assert "edge_sdk_scheduler_up 0" in r.read().decode()


class RecordingNotifier:
    watchdog_interval_s = 0.01

    def __init__(self, scheduler, fail_after: int):
        self.sent, self.scheduler, self.fail_after = [], scheduler, fail_after

    def watchdog(self):
        self.sent.append({"WATCHDOG": 1})
        if len(self.sent) == self.fail_after:
            self.scheduler.failure = "RuntimeError: boom"
        return True

    def notify(self, **fields):
        self.sent.append(fields)
        return True


def test_watchdog_stops_pinging_and_triggers_once_the_scheduler_dies():
    import time

    scheduler = SimpleNamespace(failure=None, heartbeat=time.monotonic() + 3600)
    notifier = RecordingNotifier(scheduler, fail_after=2)
    daemon = Daemon(Service(ServeConfig(), SimpleNamespace(scheduler=scheduler), "test"), notifier=notifier)
    asyncio.run(asyncio.wait_for(daemon._watchdog(check_s=0.001), TIMEOUT_S))  # returns: no more pings
    assert notifier.sent[:2] == [{"WATCHDOG": 1}] * 2
    assert notifier.sent[2:] == [{"WATCHDOG": "trigger", "STATUS": "scheduler stopped: RuntimeError: boom"}]


DEEP = 2000


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", '{"prompt": "abc \\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["abc \\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "abc", "max_tokens": 2, "stop": "\\ud800"}', "stop"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "abc \\ud800"}], "max_tokens": 2}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}], "max_tokens": 2}',
     "messages[0].content"),
    ("/v1/completions", '{"prompt": ' + "[" * DEEP + "]" * DEEP + "}", None),
    ("/v1/chat/completions", "[" * DEEP + "]" * DEEP, None),
    ("/v1/chat/completions", '{"messages": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}", None),
    ("/v1/completions", '{"prompt": "hi", "seed": 1' + "0" * 5000 + "}", None),  # beyond Python's int parsing limit
    ("/v1/completions", '{"prompt": [9223372036854775808], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "hi", "model": ["x"]}', "model"),
    ("/v1/chat/completions", '{"messages": [{"role": "tool", "content": "42", "tool_call_id": 7}], "max_tokens": 2}',
     "messages[0].tool_call_id"),
    ("/v1/chat/completions", '{"messages": [{"role": "robot", "content": "42"}], "max_tokens": 2}', "messages[0].role"),
])
def test_hostile_body_gets_400_not_500(server, path, body, param):
    status, data = post(server.url + path, body.encode())
    assert status == 400, data
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["param"] == param
    still_serves(server)


def test_nesting_is_capped_but_brackets_inside_strings_are_text(server):
    status, _ = post(server.url + "/v1/completions", json.dumps({"prompt": "[{" * 150 + "\\\"", "max_tokens": 2}).encode())
    assert status == 200
    status, data = post(server.url + "/v1/completions", ('{"prompt": "hi", "x": ' + "[" * 40 + "]" * 40 + "}").encode())
    assert status == 400 and "deeper than 32" in data["error"]["message"]


def test_a_megabyte_of_escaped_quotes_is_refused_without_a_hang(server):
    """Skipping strings before counting brackets must stay linear (a regex restarting in every string did not)."""
    status, data = post(server.url + "/v1/completions", b'{"prompt": "' + b'\\"' * 500_000)
    assert status == 400 and data["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("ids", [[999999], [5, 2**31], [2**63]])
def test_token_ids_outside_the_vocabulary_get_400(bundle_server, ids):
    status, data = post(bundle_server.url + "/v1/completions", json.dumps({"prompt": ids, "max_tokens": 2}).encode())
    assert status == 400 and data["error"]["param"] == "prompt", data
    status, data = post(bundle_server.url + "/v1/completions", json.dumps({"prompt": [3, 4], "max_tokens": 2}).encode())
    assert status == 200 and data["usage"]["prompt_tokens"] == 2


def test_developer_role_is_the_system_prompt(bundle_server):
    def ask(role):
        body = {"messages": [{"role": role, "content": "Answer briefly."}, {"role": "user", "content": "Hi"}],
                "max_tokens": 4, "temperature": 0}
        status, data = post(bundle_server.url + "/v1/chat/completions", json.dumps(body).encode())
        assert status == 200, data
        return data["usage"]["prompt_tokens"], data["choices"][0]["message"]["content"]

    with_system = ask("system")
    assert ask("developer") == with_system
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    assert post(bundle_server.url + "/v1/chat/completions", json.dumps(body).encode())[1]["usage"]["prompt_tokens"] < with_system[0]


def test_tool_role_is_served_and_a_malformed_tool_call_gets_400(bundle_server):
    body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42", "tool_call_id": "c1"}], "max_tokens": 2}
    status, data = post(bundle_server.url + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, data
    body["messages"].insert(1, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": 3}}]})
    status, data = post(bundle_server.url + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and data["error"]["param"] == "messages[1].tool_calls[0]"


def test_serve_refuses_a_busy_port_before_loading(tmp_path, capsys, monkeypatch):
    from edge_sdk.cli.main import main
    from edge_sdk.runtime.server import daemon

    def no_load(*a, **k):
        raise AssertionError("the model was loaded although the port is taken")

    monkeypatch.setattr(daemon, "build_service", no_load)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--bundle", str(tmp_path), "--port", str(port), "--emulate", "orin-nano-8gb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0] and "--port" in err[0], err

