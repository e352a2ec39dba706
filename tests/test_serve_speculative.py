"""Speculation in the daemon: the `speculative` request field, the [speculative] settings, and the
scheduler's switch (speculative steps while one sequence runs, batched steps while more do) keeping
every greedy output equal to plain greedy, through the real HTTP server and the official openai client."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge_sdk.cli.main import main
from edge_sdk.errors import ConfigError
from edge_sdk.runtime.generate.speculative import SpeculativeConfig
from edge_sdk.runtime.server.config import parse_config
from edge_sdk.runtime.server.engine import SamplingParams
from edge_sdk.runtime.server.requests import BadRequest, SpecRequest, parse_chat, parse_completion
from test_server_helpers import FakeStepModel, make_state, next_token, reference_completion

PROMPT = {"prompt": "hi"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


# --- the request field ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, parsed", [
    (None, None), (False, False), (True, SpecRequest("server")),
    ({"type": "prompt_lookup"}, SpecRequest("prompt_lookup")),
    ({"type": "prompt_lookup", "k": 4, "ngram": 2}, SpecRequest("prompt_lookup", 4, 2)),
    ({"type": "draft", "k": 16}, SpecRequest("draft", 16)),
])
def test_the_speculative_field_parses(value, parsed):
    for parse, body in ((parse_completion, PROMPT), (parse_chat, CHAT)):
        assert parse(body | {"speculative": value}, 16)[1].speculative == parsed


@pytest.mark.parametrize("value, says", [
    ("prompt_lookup", "'speculative' must be false, true or"), (1, "'speculative' must be"), ([], "'speculative' must be"),
    ({"k": 4}, "'speculative.type' must be"), ({"type": "ngram"}, "'speculative.type' must be"),
    ({"type": "draft", "k": 0}, r"'speculative.k' must be an integer in \[1, 16\]"),
    ({"type": "draft", "k": 17}, "'speculative.k' must be"), ({"type": "draft", "k": True}, "'speculative.k' must be"),
    ({"type": "draft", "k": 2.0}, "'speculative.k' must be"), ({"type": "prompt_lookup", "ngram": 9}, "'speculative.ngram' must be"),
    ({"type": "draft", "ngram": 2}, "goes with type \"prompt_lookup\" only"),
    ({"type": "draft", "temperature": 1}, "unknown key"),
])
def test_bad_speculative_values_are_one_line_naming_the_field(value, says):
    for parse, body in ((parse_completion, PROMPT), (parse_chat, CHAT)):
        with pytest.raises(BadRequest, match=says) as e:
            parse(body | {"speculative": value}, 16)
        assert e.value.param == "speculative" and "\n" not in e.value.message


def test_any_json_value_parses_or_is_a_bad_request():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    keys = st.sampled_from(["type", "k", "ngram", "x"]) | st.text(max_size=4)
    values = st.recursive(scalars | st.sampled_from(["draft", "prompt_lookup"]),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4), max_leaves=8)

    @hypothesis.given(values)
    @hypothesis.settings(max_examples=300, deadline=None)
    def check(value):
        try:
            got = parse_completion(PROMPT | {"speculative": value}, 16)[1].speculative
        except BadRequest as exc:
            assert exc.param == "speculative"
            return
        assert got is None or got is False or (isinstance(got, SpecRequest) and got.method in ("server", "prompt_lookup", "draft"))

    check()


# --- settings -----------------------------------------------------------------------------------------------------

def test_the_config_section_and_the_flags(tmp_path, capsys):
    cfg = parse_config({"speculative": {"prompt_lookup": True, "k": 6}})
    assert (cfg.speculative.prompt_lookup, cfg.speculative.k, cfg.speculative.draft) == (True, 6, "")
    path = tmp_path / "c.toml"
    path.write_text('bundle = "/b"\n[speculative]\nk = 2\n')
    assert main(["serve", "--config", str(path), "--draft", "/d", "--spec-k", "5", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["speculative"] == {"draft": "/d", "prompt_lookup": False, "k": 5}


def test_a_missing_draft_is_one_line_before_anything_loads(tmp_path, capsys):
    assert main(["serve", "--bundle", str(tmp_path), "--draft", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "draft bundle" in err and "is not a directory" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["serve", "run"])
def test_an_empty_draft_path_is_refused_by_the_flag(tmp_path, capsys, command):
    argv = ["serve", "--bundle", str(tmp_path)] if command == "serve" else ["run", str(tmp_path), "--prompt", "x"]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--draft", ""])
    assert exc.value.code == 2 and "--draft: an empty path" in capsys.readouterr().err


@pytest.mark.parametrize("raw, says", [
    ({"draft": "/d", "prompt_lookup": True}, "exclude each other"), ({"k": 0}, "speculative.k 0 is outside 1-16"),
    ({"k": 17}, "outside 1-16"), ({"prompt_lookup": 1}, "must be a bool"), ({"ngram": 3}, "unknown key"),
])
def test_bad_settings_are_refused(raw, says):
    with pytest.raises(ConfigError, match=says):
        parse_config({"speculative": raw})


# --- the switch, on a model whose next token is a pure function of the sequence -----------------------------

class FakeDraft:
    """Proposes the reference tokens, wrong at every third position: both accept and reject paths run."""

    def propose(self, history, k):
        seq, out = list(history), []
        for i in range(k):
            t = next_token(seq)
            t = t if i % 3 != 2 or t >= 256 else ord("a") + (t - ord("a") + 1) % 26
            out.append(t)
            seq.append(t)
        return out, [None] * k

    def commit(self, history):
        pass


class FakeSpecModel(FakeStepModel):
    """FakeStepModel with verify / keep; the first verify waits on `gate` (the test decides what arrives meanwhile)."""

    can_speculate = has_draft = True

    def __init__(self, gate: threading.Event | None = None, **kw):
        super().__init__(**kw)
        self.gate, self.calls, self._verified = gate, [], 0

    def step(self, seq_ids, tokens):
        self.calls.append(("step", tuple(seq_ids)))
        return super().step(seq_ids, tokens)

    def verify(self, seq_id, tokens):
        self.calls.append(("verify", seq_id, len(tokens)))
        rows = []
        for t in tokens:
            self.seqs[seq_id].append(t)
            rows.append(self._logits(self.seqs[seq_id]))
        self._verified = len(tokens)
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.wait(30)
        return np.stack(rows)

    def keep(self, seq_id, n):
        assert 0 < n <= self._verified
        del self.seqs[seq_id][len(self.seqs[seq_id]) - self._verified + n:]

    def draft_proposer(self, sampling, capacity):
        return FakeDraft()


def _wait(cond, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def _text(req) -> str:
    return bytes(i for i in req.completion_ids if i < 256).decode()


@pytest.mark.parametrize("lookup", [True, False])
def test_a_speculating_sequence_joins_a_batch_and_speculates_again_without_losing_a_token(lookup):
    gate = threading.Event()
    model = FakeSpecModel(gate)
    state = make_state(model)
    sch = state.scheduler
    sch.speculative = SpeculativeConfig(k=4, prompt_lookup=lookup)
    sch.start()
    try:
        a = sch.submit(list(b"the cat sat on the mat, the cat"), SamplingParams(max_tokens=48, temperature=0))
        _wait(lambda: any(c[0] == "verify" for c in model.calls), "the first speculative step")
        b = sch.submit(list(b"xyz"), SamplingParams(max_tokens=6, temperature=0))
        gate.set()
        _wait(lambda: a.finish_reason and b.finish_reason, "both requests")
    finally:
        sch.stop()
    assert (_text(a), a.finish_reason) == reference_completion(list(b"the cat sat on the mat, the cat"), 48)
    assert (_text(b), b.finish_reason) == reference_completion(list(b"xyz"), 6)
    kinds = [c[0] if c[0] == "verify" else f"step{len(c[1])}" for c in model.calls]
    first_batched = kinds.index("step2")
    assert "verify" in kinds[:first_batched] and "verify" in kinds[first_batched:], kinds
    assert all(c[1] == a.id for c in model.calls if c[0] == "verify")  # b ran only batched
    assert state.metrics.spec_accepted > 0 and state.memory.stats()["kv_blocks_used"] == 0


def test_a_request_opts_out_and_a_draft_needs_one_loaded():
    model = FakeSpecModel()
    state = make_state(model)
    sch = state.scheduler
    sch.speculative = SpeculativeConfig(prompt_lookup=True)
    assert sch.speculation_for(None) == sch.speculative and sch.speculation_for(False) is None
    assert sch.speculation_for(SpecRequest("server", k=6)) == SpeculativeConfig(prompt_lookup=True, k=6)
    model.has_draft = False
    with pytest.raises(BadRequest, match="has none: start it with --draft"):
        sch.speculation_for(SpecRequest("draft"))
    model.can_speculate = False
    with pytest.raises(BadRequest, match="cannot roll back"):
        sch.speculation_for(SpecRequest("prompt_lookup"))
    sch.start()
    try:
        r = sch.submit(list(b"abcabcabc"), SamplingParams(max_tokens=12, temperature=0, speculative=False))
        _wait(lambda: r.finish_reason, "the request")
    finally:
        sch.stop()
    assert _text(r) == reference_completion(list(b"abcabcabc"), 12)[0]
    assert not any(c[0] == "verify" for c in model.calls)


def test_sampling_with_speculation_keeps_the_limits():
    model = FakeSpecModel()
    state = make_state(model)
    sch = state.scheduler
    sch.speculative = SpeculativeConfig(k=3)
    sch.start()
    try:
        reqs = [sch.submit(list(b"abc"), SamplingParams(max_tokens=n, temperature=0.8, seed=n)) for n in (1, 2, 9, 30)]
        _wait(lambda: all(r.finish_reason for r in reqs), "the requests")
    finally:
        sch.stop()
    for r, n in zip(reqs, (1, 2, 9, 30)):
        assert r.finish_reason in ("length", "stop") and len(r.completion_ids) <= n
        assert r.finish_reason == "stop" or len(r.completion_ids) == n
    assert state.memory.stats()["kv_blocks_used"] == 0 and model.seqs == {}


# --- a real bundle through the HTTP server and the openai client ---------------------------------------------------

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def bundle(request) -> Path:
    pytest.importorskip("onnxruntime")
    return Path(request.getfixturevalue("tiny_bundle")("qwen2"))


@pytest.fixture(scope="module")
def reference(bundle):
    import edge_sdk
    from edge_sdk.runtime.generate.generation import GenerationConfig

    model = edge_sdk.load(bundle, provider="cpu", accuracy_level=1)

    def run(prompt: str, n: int, ids: bool = False):
        """(text, finish reason) of plain greedy, or with ids=True its token ids (EOS left out)."""
        text, reason, tokens = [], "length", []
        for c in model.generator.stream([model.tokenizer.encode(prompt)], GenerationConfig(max_new_tokens=n, temperature=0.0)):
            text.append(c.text)
            reason = c.finish_reason or reason
            if c.token_id is not None and c.token_id not in model.tokenizer.eos_token_ids:
                tokens.append(c.token_id)
        return tokens if ids else ("".join(text), reason)

    return run


class _Skewed:
    """A draft backend: another backend with a fixed bias on its logits (it disagrees with the target often)."""

    def __init__(self, backend):
        self.inner, self.io, self.provider = backend, backend.io, backend.provider
        self.kv_copies = getattr(backend, "kv_copies", 2)
        self.bias = np.random.default_rng(5).normal(size=backend.io.vocab_size).astype(np.float32) * 0.5

    def new_cache(self, batch, capacity):
        return self.inner.new_cache(batch, capacity)

    def forward(self, ids, cache, new_mask=None):
        return self.inner.forward(ids, cache, new_mask) + self.bias


def served(bundle, kind: str, skew: bool = False):
    """A service speculating server-wide with prompt lookup, or with a draft (the same bundle on the other
    graph form, optionally skewed; the size check is for real pairs)."""
    import edge_sdk
    from edge_sdk.runtime.server.adapter import BundleStepModel
    from edge_sdk.runtime.server.config import ServeConfig, SpeculativeSection
    from edge_sdk.runtime.server.daemon import build_service

    # accuracy level 1: fp32 matmuls (level 4 quantizes activations, one row differently from several)
    model = edge_sdk.load(bundle, provider="cpu", max_batch=4, accuracy_level=1)
    section = SpeculativeSection(prompt_lookup=True, k=3)
    if kind == "draft":
        other = edge_sdk.load(bundle, provider="cpu", graph="standard", accuracy_level=1)
        backend = _Skewed(other.backend) if skew else other.backend
        model.draft = SimpleNamespace(backend=backend, bundle=other.bundle, manifest=other.manifest)
        section = SpeculativeSection(draft="(loaded)", k=3)
    step_model = BundleStepModel(model, max_batch=4)
    config = ServeConfig(bundle=str(bundle), emulate="agx-orin-64gb", speculative=section)
    return build_service(config, model=step_model)


PROMPTS = ["the cat sat on the mat. the cat sat on", "def f(x):\n    return x + 1\n\ndef g(x):\n    return",
           "Hello world, hello world, hello"]


@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_one_request_then_two_concurrent_equal_plain_greedy(bundle, reference, kind):
    from test_server_helpers import ServerThread

    service = served(bundle, kind)
    m = service.state.metrics
    with ServerThread(service.state) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        mid = service.state.model_id
        for p in PROMPTS:
            r = c.completions.create(model=mid, prompt=p, max_tokens=24, temperature=0)
            assert (r.choices[0].text, r.choices[0].finish_reason) == reference(p, 24), p
        alone = m.spec_steps
        assert alone > 0 and m.spec_proposed > 0
        assert kind == "lookup" or m.spec_accepted > 0  # an unskewed draft agrees with its target
        got: dict[int, str] = {}

        def run(i, n):
            stream = c.completions.create(model=mid, prompt=PROMPTS[i], max_tokens=n, temperature=0, stream=True)
            got[i] = "".join(ch.choices[0].text for ch in stream)

        threads = [threading.Thread(target=run, args=(i, n)) for i, n in ((0, 8), (1, 32))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == {0: reference(PROMPTS[0], 8)[0], 1: reference(PROMPTS[1], 32)[0]}
        before = m.spec_steps
        r = c.completions.create(model=mid, prompt=PROMPTS[2], max_tokens=12, temperature=0, extra_body={"speculative": False})
        assert r.choices[0].text == reference(PROMPTS[2], 12)[0] and m.spec_steps == before
        if kind == "lookup":
            with pytest.raises(openai.BadRequestError) as e:
                c.completions.create(model=mid, prompt="x", max_tokens=2, extra_body={"speculative": {"type": "draft"}})
            assert "--draft" in e.value.body["message"] and e.value.body["param"] == "speculative"
        msgs = [{"role": "user", "content": PROMPTS[0]}]
        for extra in ({"response_format": {"type": "json_object"}}, {"logprobs": True, "top_logprobs": 2}):
            plain, fast = (c.chat.completions.create(model=mid, messages=msgs, max_tokens=16, temperature=0, **extra,
                                                     extra_body={"speculative": spec}).choices[0]
                           for spec in (False, {"type": "prompt_lookup", "k": 2, "ngram": 2}))
            assert (fast.message.content, fast.finish_reason) == (plain.message.content, plain.finish_reason), extra
            if fast.logprobs is not None:  # the same tokens, log-probabilities from a verify row within rounding
                assert [t.token for t in fast.logprobs.content] == [t.token for t in plain.logprobs.content]
                assert np.allclose([t.logprob for t in fast.logprobs.content], [t.logprob for t in plain.logprobs.content], atol=1e-4)
    assert service.state.memory.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_the_switch_on_a_real_kv_cache(bundle, reference, kind):
    """A speculating sequence is joined by another (batched), which ends; it speculates again: the KV
    cache stays at the accepted length across both switches."""
    service = served(bundle, kind, skew=True)
    sch, model = service.state.scheduler, service.state.model
    gate, calls, verify = threading.Event(), [], model.verify

    def gated_verify(seq_id, tokens):
        calls.append("verify")
        out = verify(seq_id, tokens)
        if not gate.is_set():
            gate.wait(30)
        return out

    step = model.step
    model.verify = gated_verify
    model.step = lambda ids, toks: calls.append(f"step{len(ids)}") or step(ids, toks)
    sch.start()
    try:
        tok = model.tokenizer.encode
        a = sch.submit(tok(PROMPTS[1]), SamplingParams(max_tokens=40, temperature=0))
        _wait(lambda: "verify" in calls, "the first speculative step")
        b = sch.submit(tok(PROMPTS[0]), SamplingParams(max_tokens=5, temperature=0))
        gate.set()
        _wait(lambda: a.finish_reason and b.finish_reason, "both requests", 120)
    finally:
        sch.stop()
    first_batched = calls.index("step2")
    assert "verify" in calls[first_batched:], calls
    for req, p, n in ((a, PROMPTS[1], 40), (b, PROMPTS[0], 5)):
        assert (req.completion_ids, req.finish_reason) == (reference(p, n, ids=True), reference(p, n)[1])


# --- prompt lookup's incremental index ------------------------------------------------------------------------

def _lookup_by_scan(cfg: SpeculativeConfig, history: list[int], k: int) -> list[int]:
    """Reference: scan every earlier window for the last n tokens, n = ngram .. ngram_min; latest match wins."""
    for n in range(min(cfg.ngram, len(history) - 1), cfg.ngram_min - 1, -1):
        tail = history[-n:]
        starts = [s for s in range(len(history) - n) if history[s:s + n] == tail]
        if starts:
            return history[starts[-1] + n:starts[-1] + n + k]
    return []


def test_prompt_lookup_index_equals_a_full_scan():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from edge_sdk.runtime.generate.speculative import PromptLookup

    tokens = st.lists(st.integers(0, 4), min_size=1, max_size=6)

    @hypothesis.given(st.integers(1, 4), st.integers(1, 4), tokens, st.lists(st.tuples(tokens, st.integers(1, 6), st.booleans()), max_size=25))
    @hypothesis.settings(max_examples=300, deadline=None)
    def check(ngram, ngram_min, start, growth):
        cfg = SpeculativeConfig(prompt_lookup=True, ngram=max(ngram, ngram_min), ngram_min=min(ngram, ngram_min))
        lookup, history = PromptLookup(cfg), list(start)
        for more, k, cut in growth:
            want = _lookup_by_scan(cfg, history, k)
            assert lookup.propose(history, k) == (want, [None] * len(want))
            history = history[: max(1, len(history) // 2)] if cut else history + more  # a cut history is not an extension

    check()
