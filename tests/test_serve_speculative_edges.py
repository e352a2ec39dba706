"""The daemon's speculative/batched switch at its edges: a stop string inside an accepted run, the
token limit reached mid-accept, a client cancelling mid-stream while speculating, and a request joining
a speculating one. A model whose next token is a pure function of its cache (test_server_helpers)
gives the reference output only while the cache holds exactly the accepted tokens."""

from __future__ import annotations

import threading

import pytest

from edge_sdk.runtime.generate.speculative import SpeculativeConfig
from edge_sdk.runtime.server.engine import SamplingParams
from test_serve_speculative import FakeSpecModel, _text, _wait
from test_server_helpers import make_state, next_token, reference_completion


class CheckedSpecModel(FakeSpecModel):
    """Asserts the scheduler's invariant at every forward: the cache holds the sequence but its last token."""

    def __init__(self, sch_ref, **kw):
        super().__init__(**kw)
        self.sch_ref, self.broken = sch_ref, []

    def _check(self, seq_id, last):
        run = self.sch_ref[0]._running.get(seq_id)
        if run is not None and run.req.completion_ids:
            want = run.req.prompt_ids + run.req.completion_ids
            if self.seqs[seq_id] + [last] != want:
                self.broken.append((seq_id, len(self.seqs[seq_id]), len(want)))

    def step(self, seq_ids, tokens):
        for s, t in zip(seq_ids, tokens):
            self._check(s, t)
        return super().step(seq_ids, tokens)

    def verify(self, seq_id, tokens):
        self._check(seq_id, tokens[0])
        return super().verify(seq_id, tokens)


def _served(lookup=True, k=4, gate=None):
    ref = [None]
    model = CheckedSpecModel(ref, gate=gate)
    state = make_state(model)
    ref[0] = sch = state.scheduler
    sch.speculative = SpeculativeConfig(k=k, k_max=16, prompt_lookup=lookup)
    return model, state, sch


def _run(sch, prompt, params):
    r = sch.submit(list(prompt), params)
    _wait(lambda: r.finish_reason, "the request")
    return r


def _events(req) -> str:
    out = []
    while not req.events.empty():
        e = req.events.get_nowait()
        out.append(e.text if e.kind == "text" else "")
    return "".join(out)


@pytest.mark.parametrize("lookup", [True, False])
def test_token_limit_reached_mid_accept_equals_plain(lookup):
    model, state, sch = _served(lookup, k=8)
    prompt = b"the cat sat on the mat, the cat sat on the mat, the cat"
    sch.start()
    try:
        got = {n: _run(sch, prompt, SamplingParams(max_tokens=n, temperature=0)) for n in range(1, 26)}
    finally:
        sch.stop()
    for n, r in got.items():
        assert (_text(r), r.finish_reason) == reference_completion(list(prompt), n), n
    assert state.metrics.spec_accepted > 0 and model.broken == [] and model.seqs == {}
    assert state.memory.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("lookup", [True, False])
def test_a_stop_string_inside_an_accepted_run_ends_as_without_speculation(lookup):
    model, state, sch = _served(lookup, k=8)
    prompt = list(b"abcabcabc")
    full, _ = reference_completion(prompt, 40)
    sch.start()
    try:
        for cut in (3, 7, 12, 20):
            stop = full[cut:cut + 2]
            spec = _run(sch, prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))
            plain = _run(sch, prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop,), speculative=False))
            assert (_events(spec), spec.finish_reason) == (_events(plain), plain.finish_reason) == (full[:full.index(stop)], "stop")
    finally:
        sch.stop()
    assert model.broken == [] and model.seqs == {} and state.memory.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("lookup", [True, False])
def test_a_client_cancelling_mid_speculation_leaves_the_next_request_whole(lookup):
    gate = threading.Event()
    model, state, sch = _served(lookup, gate=gate)
    sch.start()
    try:
        a = sch.submit(list(b"the cat sat on the mat, the cat"), SamplingParams(max_tokens=200, temperature=0))
        _wait(lambda: any(c[0] == "verify" for c in model.calls), "the first speculative step")
        a.cancel()
        b = sch.submit(list(b"xyzxyz"), SamplingParams(max_tokens=30, temperature=0))
        gate.set()
        _wait(lambda: a.finish_reason and b.finish_reason, "both requests")
        c = _run(sch, b"xyzxyz", SamplingParams(max_tokens=30, temperature=0))
    finally:
        sch.stop()
    assert a.finish_reason == "abort"
    for r in (b, c):
        assert (_text(r), r.finish_reason) == reference_completion(list(b"xyzxyz"), 30)
    assert model.broken == [] and model.seqs == {} and state.memory.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("lookup", [True, False])
def test_requests_joining_and_leaving_a_speculating_one_keep_its_cache_exact(lookup):
    model, state, sch = _served(lookup)
    prompt = list(b"the cat sat on the mat, the cat")
    sch.start()
    try:
        a = sch.submit(prompt, SamplingParams(max_tokens=120, temperature=0))
        others = []
        for i in range(6):  # short requests arriving while it runs: batched, then alone again
            _wait(lambda: len(a.completion_ids) >= 10 * (i + 1) or a.finish_reason, "progress")
            others.append(sch.submit(list(b"q%d" % i), SamplingParams(max_tokens=3 + i, temperature=0)))
        _wait(lambda: a.finish_reason and all(o.finish_reason for o in others), "all requests")
    finally:
        sch.stop()
    assert (_text(a), a.finish_reason) == reference_completion(prompt, 120)
    for i, o in enumerate(others):
        assert (_text(o), o.finish_reason) == reference_completion(list(b"q%d" % i), 3 + i)
    assert model.broken == [] and model.seqs == {} and state.memory.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("section, asked, k", [
    ({"k": 7}, "prompt_lookup", 7),  # no speculation server-wide: a request asking for it starts at [speculative] k
    ({"k": 12}, "server", 12),
    ({"k": 7, "prompt_lookup": True}, "server", 7),
    ({}, "prompt_lookup", 4),
])
def test_the_configured_k_is_where_a_requests_speculation_starts(section, asked, k):
    from edge_sdk.runtime.server.config import ServeConfig, SpeculativeSection
    from edge_sdk.runtime.server.daemon import build_service
    from edge_sdk.runtime.server.requests import SpecRequest

    config = ServeConfig(bundle="(loaded)", emulate="agx-orin-64gb", speculative=SpeculativeSection(**section))
    sch = build_service(config, model=FakeSpecModel()).state.scheduler
    got = sch.speculation_for(SpecRequest(asked))
    assert (got.k, got.prompt_lookup) == (k, True) and got.k_max >= k
    assert sch.speculation_for(SpecRequest(asked, k=2)).k == 2


@pytest.mark.parametrize("prompt", [b"a", b"ab", b"abababab"])
def test_an_ngram_longer_than_the_prompt_and_the_largest_k(prompt):
    from edge_sdk.runtime.server.requests import SpecRequest

    model, state, sch = _served(lookup=True)
    spec = sch.speculation_for(SpecRequest("prompt_lookup", k=16, ngram=8))
    sch.start()
    try:
        r = _run(sch, prompt, SamplingParams(max_tokens=40, temperature=0, speculative=SpecRequest("prompt_lookup", k=16, ngram=8)))
    finally:
        sch.stop()
    assert (spec.k, spec.ngram) == (16, 8)
    assert (_text(r), r.finish_reason) == reference_completion(list(prompt), 40)
    assert model.broken == [] and model.seqs == {} and state.memory.stats()["kv_blocks_used"] == 0


class RightDraft:
    """Proposes exactly the reference tokens: every draft token is accepted."""

    def propose(self, history, k):
        seq, out = list(history), []
        for _ in range(k):
            out.append(next_token(seq))
            seq.append(out[-1])
        return out, [None] * k

    def commit(self, history):
        pass


@pytest.mark.parametrize("prompt, stop, steps, proposed, accepted", [
    # "hi!" -> h (prefill) | step 1: drafts i q EOS x, the target takes i q EOS and the request ends on the EOS draft
    (b"hi!", (), 1, 4, 3),
    # "abcabcabc" -> v (prefill) | step 1: drafts q c u i, all taken, + q | step 2: drafts c u i q; c completes "iqc"
    (b"abcabcabc", ("iqc",), 2, 8, 5),
])
def test_accepted_tokens_are_counted_when_a_request_ends_on_an_accepted_draft(prompt, stop, steps, proposed, accepted):
    model, state, sch = _served(lookup=False)
    model.draft_proposer = lambda sampling, capacity: RightDraft()
    sch.speculative = SpeculativeConfig(k=4, adaptive=False, prompt_lookup=False)
    sch.start()
    try:
        r = _run(sch, prompt, SamplingParams(max_tokens=40, temperature=0, stop=stop))
    finally:
        sch.stop()
    assert r.finish_reason == "stop"
    m = state.metrics
    assert (m.spec_steps, m.spec_proposed, m.spec_accepted) == (steps, proposed, accepted)
    assert f"edge_sdk_speculative_accepted_tokens_total {accepted}\n" in m.render({})
    assert model.broken == [] and model.seqs == {}
