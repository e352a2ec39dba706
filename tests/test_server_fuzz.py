"""Property: no request body, however hostile, gets a 5xx or hangs the daemon.

Bodies follow the OpenAI request schema of /v1/completions and /v1/chat/completions, streaming and
not, with each field either plausible or hostile (wrong types, NaN/Infinity, huge or negative
numbers, lone surrogates, deep nesting, bytes that are not JSON). They go to the real app over a
real bundle (the runtime's reference graph under onnxruntime). A stream counts as 5xx when an error
of type server_error arrives inside it; after every body /health must still say ok.
"""

from __future__ import annotations

import http.client
from collections import Counter
import json
import urllib.request

import pytest

pytest.importorskip("starlette")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edge_sdk.runtime.server.config import ServeConfig  # noqa: E402
from edge_sdk.runtime.server.daemon import build_service  # noqa: E402
from test_server_helpers import ServerThread  # noqa: E402

TIMEOUT_S = 30  # per request; any answer here takes well under a second, so only a hang reaches it
STATS = {"bodies": 0, "5xx": 0, "hangs": 0, "status": Counter()}

text = st.text(alphabet=st.characters(exclude_categories=()), max_size=12)  # lone surrogates included
numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 2**63, -2**63]))
json_any = st.recursive(st.one_of(st.none(), st.booleans(), numbers, text),
                        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)), max_leaves=6)


@st.composite
def schema_body(draw, required: dict, optional: dict) -> dict:
    """A plausible body, then up to two of its fields replaced by anything JSON can carry."""
    body = draw(st.fixed_dictionaries(required, optional=optional))
    for _ in range(draw(st.integers(0, 2))):
        body[draw(st.sampled_from(sorted(required | optional)))] = draw(json_any)
    return body


MAX_TOKENS = st.integers(1, 6)
SAMPLING = {
    "model": st.sampled_from(["", "other"]),
    "max_completion_tokens": st.integers(1, 6),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.one_of(text, st.lists(text, max_size=5)),
    "n": st.just(1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
}
token_ids = st.lists(st.one_of(st.integers(0, 15), st.integers(-5, 2**64)), min_size=1, max_size=6)
PROMPT = st.one_of(text.filter(bool), st.lists(text, min_size=1, max_size=2), token_ids, st.lists(token_ids, max_size=2))
PART = st.fixed_dictionaries({"type": st.just("text"), "text": text})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]),
                                 "content": st.one_of(text, st.lists(PART, max_size=2))})


def encode(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()  # NaN / Infinity as Python writes them


deep = st.integers(1, 3000).map(lambda n: b'{"prompt": ' + b"[" * n + b"1" + b"]" * n + b', "max_tokens": 2}')
bodies = st.one_of(
    st.tuples(st.just("/v1/completions"), schema_body({"prompt": PROMPT, "max_tokens": MAX_TOKENS}, SAMPLING).map(encode)),
    st.tuples(st.just("/v1/chat/completions"), schema_body({"messages": st.lists(MESSAGE, min_size=1, max_size=3), "max_tokens": MAX_TOKENS}, SAMPLING).map(encode)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
              st.one_of(deep, st.binary(max_size=40), json_any.map(encode))),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_runtime_loader import make_toy_bundle

    d = tmp_path_factory.mktemp("fuzz") / "bundle"
    make_toy_bundle(d)
    with ServerThread(build_service(ServeConfig(bundle=str(d), emulate="agx-orin-64gb")).state) as s:
        yield s


def teardown_module():
    print(f"\nhypothesis bodies: {STATS['bodies']}, 5xx: {STATS['5xx']}, hangs: {STATS['hangs']}, "
          f"by status: {dict(sorted(STATS['status'].items()))}")


def send(url: str, path: str, body: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()  # a stream is read to its end
    except TimeoutError:
        STATS["hangs"] += 1
        raise AssertionError(f"no answer within {TIMEOUT_S} s to {path} {body[:200]!r}") from None
    finally:
        conn.close()


def server_error_in_stream(data: bytes) -> bool:
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("data: {") and json.loads(line[6:]).get("error", {}).get("type") == "server_error":
            return True
    return False


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(request=bodies)
def test_no_body_gets_a_5xx_or_hangs(server, request):
    path, body = request
    STATS["bodies"] += 1
    status, data = send(server.url, path, body)
    failed = status >= 500 or (status == 200 and server_error_in_stream(data))
    STATS["5xx"] += failed
    STATS["status"][status] += 1
    assert not failed, f"{status} for {path} {body[:300]!r}: {data[:300]!r}"
    assert status in (200, 400, 404, 413), (status, data[:300])
    with urllib.request.urlopen(server.url + "/health", timeout=TIMEOUT_S) as r:
        assert json.loads(r.read())["status"] == "ok"
