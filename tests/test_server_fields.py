"""Every field of a request body is honoured or refused: an OpenAI field the server does not implement
passes only at its neutral value, and an unknown field is a 400 naming it, never silently ignored."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from edge_sdk.runtime.server.requests import BadRequest, parse_chat, parse_completion  # noqa: E402
from test_server_helpers import ServerThread, make_state  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
PROMPT = {"prompt": "hi"}


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("logit_bias", {}), ("user", "u-1"),
    ("parallel_tool_calls", True), ("best_of", 1), ("speculative", None),
])
def test_neutral_values_of_unimplemented_fields_pass(field, value):
    parse_chat(CHAT | {field: value}, 16)
    parse_completion(PROMPT | {field: value}, 16)


@pytest.mark.parametrize("field, value, says", [
    ("presence_penalty", 0.5, "'presence_penalty' is not supported"),
    ("frequency_penalty", -1, "'frequency_penalty' is not supported"),
    ("logit_bias", {"50256": -100}, "'logit_bias' is not supported"),
    ("best_of", 3, "'best_of' is not supported"),
    ("presence_penalty", False, "'presence_penalty' is not supported"),  # a bool is not the number 0
    ("speculative", {"k": 4}, "'speculative.type' must be"),
    ("temprature", 0.2, "unknown field 'temprature'"),
])
def test_fields_not_honoured_are_refused_by_name(field, value, says):
    for parse, body in ((parse_chat, CHAT), (parse_completion, PROMPT)):
        with pytest.raises(BadRequest, match=says) as e:
            parse(body | {field: value}, 16)
        assert e.value.param == field


@pytest.mark.parametrize("field, value, says", [
    ("user", 5, "'user' must be a string"),
    ("stream_options", [], "'stream_options' must be an object"),
    ("stream_options", 0, "'stream_options' must be an object"),
    ("stream_options", {"include_usage": "false"}, "include_usage' must be true or false"),
])
def test_honoured_fields_of_the_wrong_type_are_refused(field, value, says):
    for parse, body in ((parse_chat, CHAT), (parse_completion, PROMPT)):
        with pytest.raises(BadRequest, match=says) as e:
            parse(body | {field: value, "stream": True}, 16)
        assert e.value.param == field


@pytest.mark.parametrize("parse, body, field", [(parse_completion, PROMPT, "top_logprobs"), (parse_completion, PROMPT, "tools"),
                                                (parse_chat, CHAT, "echo"), (parse_chat, CHAT, "prompt")])
def test_fields_of_the_other_endpoint_are_refused(parse, body, field):
    with pytest.raises(BadRequest, match=f"unknown field '{field}'"):
        parse(body | {field: 1}, 16)


def test_the_daemon_answers_an_unknown_field_with_a_400_and_keeps_serving():
    with ServerThread(make_state()) as s:
        req = urllib.request.Request(s.url + "/v1/completions", data=json.dumps(PROMPT | {"suffix": "x"}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=15)
        assert e.value.code == 400
        err = json.loads(e.value.read())["error"]
        assert err["param"] == "suffix" and "not supported" in err["message"]
        ok = urllib.request.Request(s.url + "/v1/completions", data=json.dumps(PROMPT | {"max_tokens": 2}).encode(),
                                    headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(ok, timeout=15) as r:
            assert r.status == 200
