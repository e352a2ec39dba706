"""Structured output, logprobs and tool calls on a tiny random-weight bundle: the runtime's generate(...)
and the daemon through the official openai client.

Every constrained output must parse and validate against its schema (jsonschema); logprobs are checked
against log_softmax of the backend's own logits, recomputed here from a fresh forward pass.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import edge_sdk  # noqa: E402
from edge_sdk.runtime.server.config import ServeConfig  # noqa: E402
from edge_sdk.runtime.server.daemon import build_service  # noqa: E402
from edge_sdk.runtime.server.tools import Tools, parse_output, render  # noqa: E402
from test_server_helpers import ServerThread  # noqa: E402

STATS = {"schemas": 0, "valid": 0, "invalid": 0}


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return Path(tiny_bundle("qwen2"))  # ~1k-token byte-level BPE: it can write any JSON


@pytest.fixture(scope="module")
def model(bundle):
    return edge_sdk.load(bundle, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def server(bundle):
    with ServerThread(build_service(ServeConfig(bundle=str(bundle), emulate="agx-orin-64gb")).state) as s:
        yield s


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# --- JSON schemas: every constrained output validates -----------------------------------------

NAMES = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
LEAF = st.one_of(
    st.tuples(st.integers(-50, 0), st.integers(0, 50)).map(lambda b: {"type": "integer", "minimum": b[0], "maximum": b[1]}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.text(alphabet="xyz ", min_size=1, max_size=4), min_size=1, max_size=3, unique=True).map(lambda v: {"enum": v}),
    st.integers(1, 3).map(lambda n: {"type": "string", "pattern": f"^[a-c]{{{n}}}$"}),
)


def objects(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=4).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(
            lambda req: {"type": "object", "properties": props, "required": sorted(req), "additionalProperties": False}))


SCHEMAS = st.recursive(LEAF, lambda c: st.one_of(
    objects(c), st.tuples(c, st.integers(0, 3)).map(lambda t: {"type": "array", "items": t[0], "maxItems": t[1]})),
    max_leaves=6).flatmap(lambda s: objects(st.just(s)) if s.get("type") != "object" else st.just(s))


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_every_constrained_output_validates_against_its_schema(model, schema, seed):
    c = model.generate("Fill the form:", max_new_tokens=256, temperature=1.0, seed=seed, json_schema=schema)
    STATS["schemas"] += 1
    assert c.finish_reason == "stop", (schema, c.text)
    try:
        jsonschema.validate(json.loads(c.text), schema)
    except (ValueError, jsonschema.ValidationError):
        STATS["invalid"] += 1
        raise
    STATS["valid"] += 1


def teardown_module():
    print(f"\nconstrained schemas: {STATS['schemas']}, valid: {STATS['valid']}, invalid: {STATS['invalid']}")


@pytest.mark.parametrize("kw, check", [
    ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
    ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-" and t[:3].isdigit()),
    ({"grammar": 'start: "yes" | "no"'}, lambda t: t in ("yes", "no")),
])
def test_generate_honours_each_constraint_kind(model, kw, check):
    done = 0
    for seed in range(5):
        c = model.generate("Answer:", max_new_tokens=64, temperature=1.0, seed=seed, **kw)
        if c.finish_reason == "length":  # free JSON: a random model may write one endless string
            assert "response_format" in kw and c.text.startswith("{"), c.text
            continue
        assert c.finish_reason == "stop" and check(c.text), c.text
        done += 1
    assert done


def test_bad_constraints_raise_one_line_errors(model):
    from edge_sdk.errors import ConfigError

    for kw, words in [({"regex": "(("}, "does not compile"), ({"regex": r"a[^\s\S]b"}, "matches nothing"),
                      ({"json_schema": {"type": "integr"}}, "does not compile"),
                      ({"grammar": "start: nothing_here"}, "does not compile"),
                      ({"regex": "a", "grammar": 'start: "a"'}, "one output constraint")]:
        with pytest.raises(ConfigError, match=words):
            model.generate("x", max_new_tokens=4, **kw)


# --- logprobs against the backend's own logits ------------------------------------------------

def reference_logprobs(model, ids: list[int]) -> np.ndarray:
    """log_softmax over a fresh forward pass of the whole sequence: [len(ids), V]."""
    backend = model.backend
    cache = backend.new_cache(1, len(ids))
    x = np.asarray([ids], np.int64)
    logits = backend.forward(x, cache, np.ones_like(x))[0].astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def test_generate_logprobs_equal_log_softmax_of_the_logits(model):
    prompt = model.tokenizer.encode("The sky is")
    c = model.generate("The sky is", max_new_tokens=8, logprobs=3, ignore_eos=True)
    ref = reference_logprobs(model, prompt + c.token_ids)
    for i, (tok, (lp, top)) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert lp == pytest.approx(row[tok], abs=2e-3)
        assert [t for t, _ in top] == list(np.argsort(-row, kind="stable")[:3])
        assert [l for _, l in top] == pytest.approx(np.sort(row)[::-1][:3], abs=2e-3)


def test_echo_scores_the_prompt_and_chat_logprobs_match(server, model):
    ids = model.tokenizer.encode("Water boils at one hundred degrees")
    ref = reference_logprobs(model, ids)
    status, data = post(server.url + "/v1/completions", {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 2})
    assert status == 200, data
    lp = data["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][1:] == pytest.approx([ref[i - 1][ids[i]] for i in range(1, len(ids))], abs=2e-3)
    assert data["usage"]["completion_tokens"] == 0

    r = client(server.url).chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                                   temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-9 for t in content)
    streamed = [t for ch in client(server.url).chat.completions.create(
        model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=2, stream=True) if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 6)) for t in streamed] == [(t.token, round(t.logprob, 6)) for t in content]


# --- the daemon: openai client helpers, tools, bad input ----------------------------------------

def test_token_text_bytes_rebuild_the_text_and_markers_map_to_added_ids(model):
    """logprobs' per-token bytes concatenate to the text's UTF-8 (a character split over tokens included);
    the tool-call grammar writes a marker as its added token's id, and ordinary text as None."""
    from edge_sdk.runtime.server.logprobs import TokenText

    tok, text = model.tokenizer, "héllo wörld, 東京 <tag>"
    ids = tok.encode(text, add_special_tokens=False)
    text_of = TokenText(tok)
    assert b"".join(bytes(text_of(t)[1]) for t in ids) == text.encode("utf-8")
    assert tok.added_token_ids
    for tid in tok.added_token_ids:
        assert tok.added_token_id(tok.id_to_token(tid)) == tid
        assert text_of(tid)[0] == tok.decode([tid], skip_special_tokens=False)
    assert tok.added_token_id("hello") is None and tok.added_token_id("no such token at all") is None


def test_openai_parse_with_a_pydantic_model(server):
    class Reading(pydantic.BaseModel):
        sensor: str = pydantic.Field(max_length=6)
        ok: bool

    c = client(server.url)
    parse = c.chat.completions.parse if hasattr(c.chat.completions, "parse") else c.beta.chat.completions.parse
    r = parse(model="", messages=[{"role": "user", "content": "Report"}], response_format=Reading, max_tokens=200, seed=1)
    assert isinstance(r.choices[0].message.parsed, Reading), r.choices[0].message.content


TOOLS = [{"type": "function", "function": {"name": "move", "description": "Move the arm",
          "parameters": {"type": "object", "properties": {"axis": {"enum": ["x", "y"]}, "mm": {"type": "integer", "minimum": 0, "maximum": 99}},
                         "required": ["axis", "mm"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "stop", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "move"}}])
def test_tool_choice_constrains_to_a_valid_call(server, choice):
    c = client(server.url)
    msgs = [{"role": "user", "content": "Move x by 5"}]
    r = c.chat.completions.create(model="", messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=400, seed=2)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
    calls = r.choices[0].message.tool_calls
    for call in calls:
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)
    if isinstance(choice, dict):
        assert [x.function.name for x in calls] == ["move"]
    # streamed: the client assembles the same call from the deltas
    with c.chat.completions.stream(model="", messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=400, seed=2) as s:
        final = s.get_final_completion()
    got = final.choices[0].message.tool_calls
    assert [(x.function.name, x.function.arguments) for x in got] == [(x.function.name, x.function.arguments) for x in calls]
    # the conversation continues with the tool's result
    msgs += [{"role": "assistant", "content": None, "tool_calls": [x.model_dump() for x in calls]},
             {"role": "tool", "tool_call_id": calls[0].id, "content": "done"}]
    r = c.chat.completions.create(model="", messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls


def test_tool_messages_render_in_deepseek_format():
    tools = Tools(({"name": "f", "description": "", "parameters": {"type": "object"}},), "none")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": '{"a": 1}'}, {"name": "f", "arguments": "{}"}]},
            {"role": "tool", "content": "R1"}, {"role": "tool", "content": "R2"}]
    text = render(msgs, tools, "<B>")
    assert text == ("<B>S<｜User｜>U<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n"
                    '{"a": 1}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```'
                    "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>R1"
                    "<｜tool▁output▁end｜><｜tool▁output▁begin｜>R2<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    msgs.append({"role": "assistant", "content": "ok"})
    assert render(msgs, tools).endswith("<｜tool▁outputs▁end｜>ok<｜end▁of▁sentence｜><｜Assistant｜><think>\n")
    content, calls = parse_output(text.split("<｜Assistant｜>", 1)[1])
    assert content == "" and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("f", '{"a": 1}'), ("f", "{}")]


M = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("path, body, param, words", [
    ("chat", {"messages": M, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integr"}}}},
     "response_format", "does not compile"),
    ("chat", {"messages": M, "regex": r"a[^\s\S]b"}, "regex", "matches nothing"),
    ("chat", {"messages": M, "json_schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 2}},
                                             "required": ["n"]}}, "json_schema", "unsatisfiable"),
    ("chat", {"messages": M, "grammar": "start: ("}, "grammar", "does not compile"),
    ("chat", {"messages": M, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "type object"),
    ("chat", {"messages": M, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "[0, 20]"),
    ("completions", {"prompt": "hi", "echo": True, "stream": True}, "echo", "stream"),
    ("chat", {"messages": M, "response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ("chat", {"messages": M, "tool_choice": "required"}, "tool_choice", "needs 'tools'"),
])
def test_bad_structured_requests_get_400_and_the_daemon_keeps_serving(server, path, body, param, words):
    status, data = post(f"{server.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}", body)
    assert status == 400 and data["error"]["param"] == param and words in data["error"]["message"], data
    status, data = post(server.url + "/v1/chat/completions", {"messages": M, "max_tokens": 2})
    assert status == 200


def test_a_grammar_dead_end_finishes_with_its_reason(tmp_path):
    """The reference-graph bundle predicts only its first 16 token ids; a regex whose tokens all lie beyond
    them leaves nothing to sample: the sequence ends with finish_reason grammar_dead_end, in the runtime and
    the daemon, and the daemon keeps serving."""
    from test_runtime_loader import make_toy_bundle

    make_toy_bundle(tmp_path / "toy")
    toy = edge_sdk.load(tmp_path / "toy", provider="cpu", threads=1)
    c = toy.generate("x", max_new_tokens=8, regex="zebra")
    assert (c.finish_reason, c.token_ids) == ("grammar_dead_end", [])
    with ServerThread(build_service(ServeConfig(bundle=str(tmp_path / "toy"), emulate="agx-orin-64gb")).state) as s:
        status, data = post(s.url + "/v1/completions", {"prompt": "x", "max_tokens": 8, "regex": "zebra"})
        assert status == 200 and data["choices"][0]["finish_reason"] == "grammar_dead_end", data
        assert post(s.url + "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


def test_logits_wider_than_the_tokenizer_and_an_eos_past_it(bundle):
    """The 1.5B shape pads logits past DeepSeek's tokenizer (151,936 vs 129,280) and its manifest lists the
    model's EOS id beyond the tokenizer: the mask covers the tokenizer, the padded ids stay masked."""
    from edge_sdk.runtime.generate.constrain import GrammarCompiler, constraint
    from edge_sdk.runtime.generate.tokenizer import Tokenizer

    tok = Tokenizer(bundle)
    n = tok.vocab_size
    compiler = GrammarCompiler.for_tokenizer(_WithEos(tok, (n + 50,)), n + 100)
    m = compiler.matcher(constraint(regex="[0-9]{2}"))
    allowed = m.allowed()
    assert allowed.shape == (n + 100,) and not allowed[n:].any() and allowed[:n].any()
    logits = np.random.default_rng(0).standard_normal(n + 100).astype(np.float32)
    out = m.apply(logits)
    assert np.isneginf(out[n:]).all()
    assert np.array_equal(out[allowed], logits[allowed]) and np.isneginf(out[~allowed]).all()
    for ch in "42":
        assert m.accept(tok.encode(ch, add_special_tokens=False)[0])
    assert m.done


class _WithEos:
    """A tokenizer whose manifest names extra EOS ids."""

    def __init__(self, tok, extra):
        self.serialized, self.vocab_size, self.eos_token_ids = tok.serialized, tok.vocab_size, tuple(tok.eos_token_ids) + tuple(extra)


# --- streamed tool calls ----------------------------------------------------------------------

def _raw_calls(calls: list[tuple[str, str]], content: str = "") -> str:
    from edge_sdk.runtime.server import tools as T

    block = "\n".join(f"{T.CALL_BEGIN}function{T.SEP}{n}\n```json\n{a}\n```{T.CALL_END}" for n, a in calls)
    return content + (T.CALLS_BEGIN + block + T.CALLS_END if calls else "") + T.EOS


ARGS = st.dictionaries(st.text(alphabet="ab`\n{}\"", max_size=3), st.text(max_size=4), max_size=3).map(json.dumps)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(calls=st.lists(st.tuples(st.sampled_from(["move", "stop", "a-b_1"]), ARGS), max_size=3),
       content=st.text(alphabet="ab <｜\n`é", max_size=6), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_streamed_tool_call_deltas_assemble_to_the_parsed_calls(calls, content, cuts):
    """Fed the raw text in any pieces, CallStream's deltas rebuild parse_output's content and calls: the
    name arrives first with an id and empty arguments, arguments as fragments, nothing sent twice."""
    from edge_sdk.runtime.server.tools import CallStream

    raw = _raw_calls(calls, content)
    want_content, want_calls = parse_output(raw)
    stream, deltas = CallStream(), []
    for cut in sorted({c for c in cuts if c < len(raw)}):
        deltas += stream.feed(raw[:cut])
    deltas += stream.feed(raw, final=True)
    got, text = [], ""
    for d in deltas:
        text += d.get("content", "")
        for tc in d.get("tool_calls", []):
            if "id" in tc:
                assert tc["index"] == len(got) and tc["function"]["arguments"] == "" and tc["id"].startswith("call_")
                got.append([tc["function"]["name"], ""])
            else:
                assert tc["index"] == len(got) - 1 and tc["function"]["arguments"]
                got[-1][1] += tc["function"]["arguments"]
    assert [tuple(g) for g in got] == [(c["function"]["name"], c["function"]["arguments"]) for c in want_calls]
    assert stream.calls == len(want_calls)
    assert text == (want_content if not want_calls else content)


def test_tool_call_arguments_are_sent_as_they_are_written():
    from edge_sdk.runtime.server.tools import CallStream

    raw = _raw_calls([("move", '{"axis": "x", "mm": 5}')], "ok")
    cut = raw.index('"mm"')
    stream = CallStream()
    early = stream.feed(raw[:cut])
    assert early[0] == {"content": "ok"}
    assert early[1]["tool_calls"][0]["function"] == {"name": "move", "arguments": ""}
    assert early[2]["tool_calls"][0]["function"]["arguments"] == '{"axis": "x", '
    rest = stream.feed(raw, final=True)
    assert rest == [{"tool_calls": [{"index": 0, "function": {"arguments": '"mm": 5}'}}]}] and stream.calls == 1


def test_streamed_tool_calls_through_the_openai_client(server):
    c = client(server.url)
    msgs = [{"role": "user", "content": "Move x by 5"}]
    ref = c.chat.completions.create(model="", messages=msgs, tools=TOOLS, tool_choice="required", max_tokens=400, seed=3)
    want = [(x.function.name, x.function.arguments) for x in ref.choices[0].message.tool_calls]
    starts, fragments = [], {}
    with c.chat.completions.stream(model="", messages=msgs, tools=TOOLS, tool_choice="required", max_tokens=400, seed=3) as s:
        for ev in s:
            if ev.type == "chunk":
                for tc in ev.chunk.choices[0].delta.tool_calls or []:
                    if tc.id:
                        assert tc.index == len(starts) and tc.function.name and tc.function.arguments == ""
                        starts.append(tc.function.name)
            elif ev.type == "tool_calls.function.arguments.delta":
                fragments[ev.index] = fragments.get(ev.index, "") + ev.arguments_delta
        final = s.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(x.function.name, x.function.arguments) for x in final.choices[0].message.tool_calls] == want
    assert [(starts[i], fragments.get(i, "")) for i in range(len(starts))] == want


def test_streamed_content_beside_tools_is_the_visible_text():
    """Content is sent as the text without special tokens (as without tools); calls are read from the raw text."""
    from edge_sdk.runtime.server import tools as T

    vocab = ["Hi", "<｜User｜>", " there", T.CALLS_BEGIN, T.CALL_BEGIN, "function", T.SEP, "move\n```json\n", '{"a": ',
             "1}", "\n```", T.CALL_END, T.CALLS_END, T.EOS]
    special = {1, 3, 4, 6, 11, 12, 13}
    raw = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    visible = lambda ids: "".join(vocab[i] for i in ids if i not in special)  # noqa: E731
    stream, deltas = T.CallStream(), []
    ids = list(range(len(vocab)))
    for n in range(1, len(ids) + 1):
        deltas += stream.feed_ids(ids[:n], raw, visible, final=n == len(ids))
    assert "".join(d.get("content", "") for d in deltas) == "Hi there"
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["function"] == {"name": "move", "arguments": ""}
    assert [c["function"]["arguments"] for c in calls[1:]] == ['{"a": ', "1}"] and stream.calls == 1


def test_a_streamed_reply_without_calls_matches_the_plain_one(server):
    c = client(server.url)
    kw = dict(model="", messages=[{"role": "user", "content": "Hello"}], tools=TOOLS, max_tokens=24, temperature=0)
    plain = c.chat.completions.create(**kw).choices[0]
    content, reasoning, reason = "", "", None
    for chunk in c.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        reason = chunk.choices[0].finish_reason or reason
    assert not plain.message.tool_calls and reason == plain.finish_reason
    assert (content, reasoning) == (plain.message.content or "", getattr(plain.message, "reasoning_content", None) or "")


def test_the_grammar_compiler_is_built_once_in_the_background(bundle):
    from edge_sdk.runtime.server import structured

    model = edge_sdk.load(bundle, provider="cpu", threads=1)
    structured.warm(model).join(120)
    built = structured._COMPILERS.get(model)
    assert built is not None and structured.compiler_for(model) is built
    opts = structured.parse_options({"response_format": {"type": "json_object"}}, chat=False)
    structured.compile_for(model, opts)
    assert opts.matcher is not None and structured._COMPILERS.get(model) is built
    bare = type("NoTokenizer", (), {})()
    structured.warm(bare).join(10)  # no tokenizer: nothing built, nothing raised
    assert structured._COMPILERS.get(bare) is None
    with pytest.raises(structured.BadRequest, match="no tokenizer"):
        structured.compiler_for(bare, "response_format")


@pytest.mark.parametrize("body, param, words", [
    ({"regex": r"q[^\s\S]z"}, "regex", "matches nothing"),
    ({"grammar": "start: (("}, "grammar", "does not compile"),
    ({"json_schema": {"type": "object", "properties": {"m": {"type": "integer", "minimum": 9, "maximum": 1}}, "required": ["m"]}},
     "json_schema", "unsatisfiable"),
])
def test_a_grammar_that_failed_to_build_is_refused_again_without_rebuilding(server, monkeypatch, body, param, words):
    from edge_sdk.runtime.generate.constrain import GrammarCompiler

    builds, build = [], GrammarCompiler._build
    monkeypatch.setattr(GrammarCompiler, "_build", lambda self, c, grammar: builds.append(c) or build(self, c, grammar))
    answers = [post(server.url + "/v1/chat/completions", {"messages": M, "max_tokens": 2, **body}) for _ in range(3)]
    status, data = answers[0]
    assert status == 400 and data["error"]["param"] == param and words in data["error"]["message"], data
    assert "\n" not in data["error"]["message"] and answers == [answers[0]] * 3
    assert len(builds) == 1


def test_failed_grammars_are_remembered_within_the_cache_bound(model, monkeypatch):
    from edge_sdk.errors import ConfigError
    from edge_sdk.runtime.generate import constrain

    monkeypatch.setattr(constrain, "GRAMMAR_CACHE", 2)
    compiler = constrain.GrammarCompiler.for_tokenizer(model.tokenizer, model.backend.io.vocab_size)
    builds, build = [], compiler._build
    monkeypatch.setattr(compiler, "_build", lambda c, grammar: builds.append(c.source) or build(c, grammar))
    bad = [constrain.constraint(regex=f"{x}[^\\s\\S]") for x in "abc"]
    for c in bad + bad[1:] + bad[:1]:  # a, b, c built; b, c remembered; a was dropped (the oldest) and is built again
        with pytest.raises(ConfigError, match="matches nothing"):
            compiler.matcher(c)
    assert builds == [r"a[^\s\S]", r"b[^\s\S]", r"c[^\s\S]", r"a[^\s\S]"]
    good = constrain.constraint(regex="[0-9]+")
    compiler.matcher(good)
    compiler.matcher(good)  # a grammar that built: its matcher is made from the cached grammar text each time
    assert builds[-2:] == ["[0-9]+", "[0-9]+"]
