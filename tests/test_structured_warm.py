"""The grammar compiler's background build at daemon start (structured.warm) racing the first
constrained request, and a tokenizer the grammar engine cannot read: built once, no traceback from
the background thread, a one-line 400 for the request."""

from __future__ import annotations

import threading

import pytest

from edge_sdk.runtime.server import structured


class _Tok:
    eos_token_ids = (0,)
    vocab_size = 8

    def __init__(self, text: str = "{}"):
        self.text = text

    def serialized(self) -> str:
        return self.text


class _Model:
    vocab_size = 8

    def __init__(self, tok):
        self.tokenizer = tok


class _Compiler:
    def matcher(self, constraint):
        return ("matcher", constraint)


def _json_opts():
    return structured.parse_options({"response_format": {"type": "json_object"}}, chat=False)


def test_a_first_request_racing_the_background_build_waits_for_it_and_shares_it(monkeypatch):
    started, release, builds = threading.Event(), threading.Event(), []

    def build(tok, vocab):
        builds.append(tok)
        started.set()
        assert release.wait(30)
        return _Compiler()

    monkeypatch.setattr(structured.GrammarCompiler, "for_tokenizer", staticmethod(build))
    model = _Model(_Tok())
    warming = structured.warm(model)
    assert started.wait(30)
    opts, done = _json_opts(), threading.Event()
    first = threading.Thread(target=lambda: (structured.compile_for(model, opts), done.set()))
    first.start()
    assert not done.wait(0.05)  # behind the build, not building a second one
    release.set()
    first.join(30)
    warming.join(30)
    assert done.is_set() and len(builds) == 1 and opts.matcher[0] == "matcher"
    assert structured.compiler_for(model) is structured._COMPILERS[model]


def test_a_tokenizer_the_engine_cannot_read_is_one_line_not_a_traceback(monkeypatch):
    pytest.importorskip("llguidance")
    raised = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    model = _Model(_Tok('{"bad": 1'))  # not a tokenizer.json the engine can load
    structured.warm(model).join(60)
    assert raised == []  # the background build logs one line, its thread does not die with a traceback
    opts = _json_opts()
    with pytest.raises(structured.BadRequest) as e:  # a 400 naming the field, not a 500
        structured.compile_for(model, opts)
    assert e.value.param == "response_format" and "\n" not in str(e.value) and "tokenizer" in str(e.value)
