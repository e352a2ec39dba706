"""The HTTP layer and scheduler through the official openai client, over a deterministic step model.

Every expected text is recomputed by `reference_completion`; the end-to-end tests over a real
bundle live in test_server_e2e.py.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from edge_sdk.runtime.server.api import api_error_from
from edge_sdk.runtime.server.memory import MemoryBusyError, RequestTooLargeError
from test_server_helpers import FakeStepModel, ServerThread, make_state, reference_completion


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def wait_until(cond, timeout_s=60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def chat_prompt(model, text):
    return model.encode_chat([{"role": "user", "content": text}])


def post(url, body: bytes, headers=None):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


@pytest.fixture
def server():
    with ServerThread(make_state()) as s:
        yield s


def test_models_lists_the_served_model(server):
    models = client(server.url).models.list()
    assert [m.id for m in models.data] == ["fake-tiny"]


def test_chat_completion_matches_reference(server):
    c = client(server.url)
    r = c.chat.completions.create(model="fake-tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=12, temperature=0)
    want, reason = reference_completion(chat_prompt(server.state.model, "hello"), 12)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == reason == "length"
    assert r.choices[0].message.role == "assistant"
    n_prompt = len(chat_prompt(server.state.model, "hello"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)


def test_chat_stream_concatenates_to_reference_and_reports_usage(server):
    c = client(server.url)
    chunks = list(c.chat.completions.create(model="fake-tiny", messages=[{"role": "user", "content": "hi!"}], max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    want, reason = reference_completion(chat_prompt(server.state.model, "hi!"), 20)
    assert text == want and reason == "stop" and len(want) == 3  # '!' in the prompt: EOS after three letters
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_completion_plain_and_stream_agree(server):
    c = client(server.url)
    r = c.completions.create(model="fake-tiny", prompt="The sky", max_tokens=16, temperature=0)
    want, _ = reference_completion(list(b"The sky"), 16)
    assert r.choices[0].text == want and r.usage.prompt_tokens == 7
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="fake-tiny", prompt="The sky", max_tokens=16,
                                                                        temperature=0, stream=True))
    assert streamed == want


def test_stop_string_cuts_the_text(server):
    want, _ = reference_completion(list(b"abc"), 30)
    stop = want[5:7]
    cut = want[: want.index(stop)]
    c = client(server.url)
    r = c.completions.create(model="fake-tiny", prompt="abc", max_tokens=30, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="fake-tiny", prompt="abc", max_tokens=30,
                                                                        temperature=0, stop=stop, stream=True))
    assert streamed == cut


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(server):
    c = client(server.url)
    args = dict(model="fake-tiny", prompt="seed", max_tokens=40, temperature=1.5, top_p=0.95)
    a = c.completions.create(seed=7, **args).choices[0].text
    b = c.completions.create(seed=7, **args).choices[0].text
    greedy = reference_completion(list(b"seed"), 40)[0]
    other = c.completions.create(seed=8, **args).choices[0].text
    assert a == b and a != greedy and other != a


def test_four_concurrent_streams_are_correct_and_share_decode_steps():
    model = FakeStepModel(step_delay_s=0.005)
    gate, step = threading.Event(), model.step

    def gated(seq_ids, tokens):  # decoding waits until all four are in: they overlap however the threads start
        assert gate.wait(60)
        return step(seq_ids, tokens)

    model.step = gated
    with ServerThread(make_state(model)) as s:
        c = client(s.url)
        prompts = [f"stream number {i}" for i in range(4)]
        results: dict[int, str] = {}

        def run(i):
            stream = c.completions.create(model="fake-tiny", prompt=prompts[i], max_tokens=48, temperature=0, stream=True)
            results[i] = "".join(ch.choices[0].text for ch in stream)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        sched = s.state.scheduler
        assert wait_until(lambda: sched.queue_depth() + sched.running() == 4), "the four requests did not all arrive"
        gate.set()
        for t in threads:
            t.join(60)
        for i, p in enumerate(prompts):
            assert results[i] == reference_completion(list(p.encode()), 48)[0]
        assert max(model.batch_sizes) >= 2  # decode steps were shared
        assert model.seqs == {} and s.state.memory.stats()["kv_blocks_used"] == 0


def test_over_context_gets_413_in_openai_shape(server):
    c = client(server.url)
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="fake-tiny", prompt="x" * 500, max_tokens=100)
    assert e.value.status_code == 413
    assert e.value.body["code"] == "context_length_exceeded" and "512" in e.value.body["message"]


def test_busy_gets_503_with_retry_after_when_configured_to_reject():
    model = FakeStepModel(context_length=256, step_delay_s=0.05)  # the first holds its blocks for 10 s unless closed
    # a pool of 256 tokens: two 200-token requests cannot run together
    with ServerThread(make_state(model, kv_blocks_tokens=256, when_full="reject")) as s:
        c = client(s.url)
        first = c.completions.create(model="fake-tiny", prompt="long", max_tokens=200, temperature=0, stream=True)
        next(iter(first))  # admitted and holding its blocks
        status, headers, body = post(s.url + "/v1/completions", json.dumps({"prompt": "two", "max_tokens": 200}).encode())
        assert status == 503 and headers["Retry-After"] == "3"
        assert body["error"]["type"] == "server_error" and "blocks free" in body["error"]["message"]
        first.close()


@pytest.mark.parametrize("base", [RequestTooLargeError, MemoryBusyError])
def test_memory_errors_answer_with_their_own_http_status(base):
    class Refused(base):
        http_status = 429

    err = api_error_from(Refused("no room", hint="retry"))
    assert err.status == 429 and err.response().status_code == 429 and "no room" in err.message


def test_must_wait_request_waits_when_configured():
    model = FakeStepModel(context_length=256, step_delay_s=0.01)
    with ServerThread(make_state(model, kv_blocks_tokens=256, when_full="wait")) as s:
        c = client(s.url)
        out = {}

        def run(i, prompt):
            out[i] = c.completions.create(model="fake-tiny", prompt=prompt, max_tokens=200, temperature=0).choices[0].text

        threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(["first", "second"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert out == {0: reference_completion(list(b"first"), 200)[0], 1: reference_completion(list(b"second"), 200)[0]}
        assert max(model.batch_sizes) == 1  # they never fitted together: the second waited


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 0}).encode(), "top_p"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), "n"),
])
def test_malformed_body_gets_400_in_openai_shape(server, body, param):
    status, _, data = post(server.url + "/v1/chat/completions", body)
    assert status == 400
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["type"] == "invalid_request_error" and data["error"]["param"] == param


def test_oversized_body_gets_413():
    with ServerThread(make_state(max_request_bytes=2048)) as s:
        status, _, data = post(s.url + "/v1/completions", json.dumps({"prompt": "z" * 4096}).encode())
        assert status == 413 and data["error"]["code"] == "request_too_large"


def test_unknown_model_gets_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server.url).completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"


def test_api_key_is_required_when_configured():
    with ServerThread(make_state(api_key="s3cret")) as s:
        with pytest.raises(openai.AuthenticationError) as e:
            client(s.url, "wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert client(s.url, "s3cret").models.list().data[0].id == "fake-tiny"
        with urllib.request.urlopen(s.url + "/health", timeout=10) as r:  # probes need no key
            assert json.loads(r.read())["status"] == "ok"


def test_client_disconnect_cancels_and_frees_memory():
    model = FakeStepModel(step_delay_s=0.05)  # 400 tokens take 20 s: the hang-up is seen long before
    with ServerThread(make_state(model)) as s:
        stream = client(s.url).completions.create(model="fake-tiny", prompt="bye", max_tokens=400, temperature=0, stream=True)
        it = iter(stream)
        next(it)
        next(it)
        stream.close()
        # memory is released before the finish is counted: wait for all of it
        wait_until(lambda: s.state.metrics.finished.get("abort") == 1 and not s.state.memory.stats()["kv_blocks_used"])
        assert s.state.memory.stats()["kv_blocks_used"] == 0 and model.seqs == {}
        assert s.state.metrics.finished.get("abort") == 1


def test_model_failure_is_a_500_and_the_daemon_keeps_serving(server):
    server.state.model.fail_next = True
    with pytest.raises(openai.InternalServerError) as e:
        client(server.url).completions.create(model="fake-tiny", prompt="boom", max_tokens=5)
    assert "device lost" in e.value.body["message"]
    r = client(server.url).completions.create(model="fake-tiny", prompt="again", max_tokens=5, temperature=0)
    assert r.choices[0].text == reference_completion(list(b"again"), 5)[0]
    assert server.state.memory.stats()["kv_blocks_used"] == 0


def test_metrics_expose_tokens_ttft_queue_kv_memory_power(server):
    client(server.url).completions.create(model="fake-tiny", prompt="count", max_tokens=10, temperature=0)
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain")
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert samples["edge_sdk_generation_tokens_total"] == "10"
    assert samples["edge_sdk_prompt_tokens_total"] == "5"
    assert samples["edge_sdk_ttft_seconds_count"] == "1"
    assert samples['edge_sdk_requests_finished_total{reason="length"}'] == "1"
    assert samples['edge_sdk_http_requests_total{endpoint="completions",status="200"}'] == "1"
    assert samples["edge_sdk_queue_depth"] == "0" and samples["edge_sdk_kv_blocks_used"] == "0"
    assert samples['edge_sdk_power_mode_info{mode="MODE_30W"}'] == "1"
    assert float(samples["edge_sdk_decode_tokens_per_second"]) > 0
    assert samples["edge_sdk_decode_step_tokens_total"] == "9"  # the first token comes from prefill
    assert float(samples["edge_sdk_decode_seconds_total"]) > 0
    assert int(samples["edge_sdk_process_resident_bytes"]) > 10 << 20


def test_stream_that_times_out_in_the_queue_gets_a_real_503():
    model = FakeStepModel(context_length=256, step_delay_s=0.05)  # the first holds the pool for 10 s unless closed
    with ServerThread(make_state(model, kv_blocks_tokens=256, queue_timeout_s=0.3)) as s:
        c = client(s.url)
        first = c.completions.create(model="fake-tiny", prompt="hold", max_tokens=200, temperature=0, stream=True)
        next(iter(first))
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="fake-tiny", prompt="late", max_tokens=200, stream=True)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "3"
        assert "waited" in e.value.body["message"]
        first.close()
        assert s.state.metrics.rejected == 1


def test_non_streaming_client_that_hangs_up_cancels_its_request():
    model = FakeStepModel(step_delay_s=0.05)  # 400 tokens take 20 s: the hang-up is seen long before
    with ServerThread(make_state(model)) as s:
        req = urllib.request.Request(s.url + "/v1/completions", data=json.dumps({"prompt": "slow", "max_tokens": 400}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(OSError):  # socket.timeout / URLError: the client gives up
            urllib.request.urlopen(req, timeout=0.3)
        wait_until(lambda: s.state.metrics.finished.get("abort") == 1)
        assert s.state.metrics.finished.get("abort") == 1
        assert s.state.memory.stats()["kv_blocks_used"] == 0 and model.seqs == {}
