"""Speculative decoding on the layer-streamed executors (runtime/paging/): greedy output equal to plain
greedy of the resident model, with prompt lookup and with a draft bundle, the KV cache holding exactly
the accepted tokens after a partially accepted step, and the daemon speculating on a paged model."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import edge_sdk
from edge_sdk.paging_model import PAGE, page_round
from edge_sdk.runtime.backends.base import can_rollback
from edge_sdk.runtime.backends.kv_cache import SharedKVCache
from edge_sdk.runtime.paging.backend import PagedBackend, fixed_bytes, layer_table
from test_speculative import _Skewed  # noqa: E402
from edge_sdk.runtime.paging.fused import FusedPagedBackend

pytest.importorskip("onnxruntime")

EXACT = dict(provider="cpu", accuracy_level=1, threads=1, log_provider=False)
EXECUTORS = {"fused": FusedPagedBackend, "standard": PagedBackend}
LAYERS = 3  # the fewest a budget can page every layer of: lm_head and two layer buffers stay below the whole
PROMPTS = ["Hello world, hello world, hello", "the cat sat on the mat. the cat sat on", "a b c a b c a b", "x",
           "def f(x):\n    return x + 1\n\ndef g(x):\n    return", "1 2 3 4 5 1 2 3 4 5 1 2", "Once upon a time"]


@pytest.fixture(scope="session")
def paged_bundle(tmp_path_factory):
    """A tiny Qwen2 model with 3 decoder layers, converted once per session, and a memory budget under
    which both executors stream every layer."""
    pytest.importorskip("torch")
    from edge_sdk.converters import convert
    from edge_sdk.converters.tiny import build_model_dir, build_tokenizer, default_calibration_text, tiny_config

    from conftest import TINY_CONVERT

    root = tmp_path_factory.mktemp("paged-speculative")
    tok = build_tokenizer([default_calibration_text()])
    cfg = tiny_config("qwen2", tok.get_vocab_size(), num_hidden_layers=LAYERS)
    convert(build_model_dir(root / "model", "qwen2", seed=1, config=cfg, tokenizer=tok), root / "bundle", **TINY_CONVERT)
    manifest = json.loads((root / "bundle" / "manifest.json").read_text())
    budget = fixed_bytes(manifest) + 2 * page_round(layer_table(manifest)[0][1]) + 16 * PAGE
    return root / "bundle", budget


@pytest.fixture(scope="module")
def models(paged_bundle):
    """graph form -> (resident model, paged model)."""
    bundle, budget = paged_bundle
    out = {}
    for graph, cls in EXECUTORS.items():
        paged = edge_sdk.load(bundle, memory_budget=budget, graph=graph, **EXACT)
        assert type(paged.backend) is cls and paged.backend.plan.paged == tuple(range(LAYERS)) and can_rollback(paged.backend)
        out[graph] = edge_sdk.load(bundle, graph=graph, **EXACT), paged
    yield out
    for _, paged in out.values():
        paged.backend.close()


@pytest.mark.parametrize("graph", list(EXECUTORS))
@pytest.mark.parametrize("spec", ["prompt-lookup", {"prompt_lookup": True, "k": 2, "ngram": 1}, "skewed draft"])
def test_paged_speculative_greedy_equals_resident_greedy(models, graph, spec):
    resident, paged = models[graph]
    if spec == "skewed draft":  # the same bundle, paged on the other executor and biased: drafts are kept, cut short
        other = models["standard" if graph == "fused" else "fused"][1]  # and rejected, and the draft's cache rolls back too
        paged.draft, paged.generator.draft, spec = other, _Skewed(other.backend), {"k": 3}
    proposed = accepted = 0
    try:
        for prompt in PROMPTS:
            plain = resident.generate(prompt, max_new_tokens=24, speculative=False)
            fast = paged.generate(prompt, max_new_tokens=24, speculative=spec)
            proposed, accepted = proposed + fast.timings.spec_proposed, accepted + fast.timings.spec_accepted
            assert (fast.token_ids, fast.text, fast.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason), prompt
    finally:
        paged.draft = paged.generator.draft = None
    assert 0 < accepted < proposed  # both accepted and rejected draft tokens went through the paged cache


@pytest.mark.parametrize("graph", list(EXECUTORS))
def test_a_draft_bundle_with_a_paged_target(models, paged_bundle, tiny_bundle, graph):
    """edge_sdk.load(target, memory_budget=..., draft=...): the draft (the 2-layer tiny bundle, same tokenizer,
    smaller) is loaded with the same budget and the target streams its layers; output equals plain greedy."""
    bundle, budget = paged_bundle
    resident = models[graph][0]
    model = edge_sdk.load(bundle, memory_budget=budget, graph=graph, draft=tiny_bundle("qwen2"), **EXACT)
    try:
        assert model.backend.plan.paged == tuple(range(LAYERS))
        proposed = 0
        for prompt in PROMPTS[:4]:
            fast = model.generate(prompt, max_new_tokens=16)  # a loaded draft: speculation is on by default
            proposed += fast.timings.spec_proposed
            assert fast.token_ids == resident.generate(prompt, max_new_tokens=16, speculative=False).token_ids, prompt
        assert proposed > 0
    finally:
        model.backend.close()


@pytest.mark.parametrize("graph", list(EXECUTORS))
def test_the_cache_holds_the_accepted_tokens_after_a_partially_accepted_step(models, graph):
    """One verify forward of [t1, t2, t3, wrong, x] on the paged executor keeps t1..t3 (t2, t3 accepted, the
    target's t4 replaces `wrong`): the cache's length is then the prompt plus those tokens, its keys and
    values are the resident plain run's, and the next step continues it exactly."""
    resident, paged = models[graph]
    prompt = resident.tokenizer.encode(PROMPTS[4])
    n = len(prompt)
    ref_cache = resident.backend.new_cache(1, n + 8)
    rows = [resident.generator.prefill(np.asarray([prompt]), np.ones((1, n), np.int64), ref_cache)[0]]
    tokens = []
    for _ in range(5):  # plain greedy, one token per step
        tokens.append(int(np.argmax(rows[-1])))
        rows.append(resident.backend.forward(np.asarray([[tokens[-1]]]), ref_cache)[0, -1])
    t1, t2, t3, t4, t5 = tokens
    wrong = (t4 + 1) % resident.backend.io.vocab_size

    cache = paged.backend.new_cache(1, n + 8)
    paged.generator.prefill(np.asarray([prompt]), np.ones((1, n), np.int64), cache)
    verify = paged.backend.forward(np.asarray([[t1, t2, t3, wrong, 7]]), cache)[0]
    assert [int(np.argmax(r)) for r in verify[:3]] == [t2, t3, t4]  # t2, t3 accepted; t4 is the target's own
    before = [b.copy() for b in cache.buffers[0][0]]
    cache.rollback(n + 3)  # what the speculative loop keeps: the prompt, t1, t2, t3 (t4 is fed next)
    assert cache.length == n + 3 and cache.mask.shape == (1, n + 3)
    if isinstance(cache, SharedKVCache):  # the fused executor's shared buffer: the rollback sets the length
        assert all(np.array_equal(a, b) for a, b in zip(before, cache.buffers[0][0]))
    for layer in range(LAYERS):
        for kind in range(2):
            want = ref_cache.past(layer, kind)[:, :, :n + 3]
            assert np.allclose(cache.past(layer, kind), want, atol=1e-4), (layer, kind)
    nxt = paged.backend.forward(np.asarray([[t4]]), cache)[0, -1]
    assert cache.length == n + 4 and int(np.argmax(nxt)) == t5 and np.allclose(nxt, rows[4], atol=1e-3)


def test_the_bundle_graph_executor_speculates_whatever_provider_runs_its_layers(models):
    """The bundle graph's executor is what the CUDA and TensorRT providers page with; its KV cache is host
    memory there too, so speculation is not refused as it is for a resident model's device cache."""
    resident, paged = models["standard"]
    provider = paged.backend.provider
    paged.backend.provider = "CUDAExecutionProvider"
    try:
        fast = paged.generate(PROMPTS[0], max_new_tokens=12, speculative="prompt-lookup")
    finally:
        paged.backend.provider = provider
    assert fast.timings.spec_proposed > 0
    assert fast.token_ids == resident.generate(PROMPTS[0], max_new_tokens=12, speculative=False).token_ids


@pytest.mark.parametrize("graph", list(EXECUTORS))
def test_the_daemon_speculates_on_a_paged_model(paged_bundle, models, graph):
    """serve --memory-budget with --prompt-lookup: the scheduler's verify / keep run on the paged executor's
    cache, and the output is plain greedy's."""
    from edge_sdk.runtime.server.adapter import BundleStepModel
    from edge_sdk.runtime.server.config import ServeConfig, SpeculativeSection
    from edge_sdk.runtime.server.daemon import build_service
    from edge_sdk.runtime.server.engine import SamplingParams

    bundle, budget = paged_bundle
    resident = models[graph][0]
    model = edge_sdk.load(bundle, memory_budget=budget, max_batch=2, graph=graph, **EXACT)
    step_model = BundleStepModel(model, max_batch=2)
    assert step_model.can_speculate
    service = build_service(ServeConfig(bundle=str(bundle), emulate="agx-orin-64gb",
                                        speculative=SpeculativeSection(prompt_lookup=True, k=3)), model=step_model)
    sch = service.state.scheduler
    sch.start()
    try:
        reqs = []
        for p in PROMPTS[:3]:  # one at a time: a request running alone speculates
            reqs.append((p, sch.submit(model.tokenizer.encode(p), SamplingParams(max_tokens=20, temperature=0))))
            deadline = time.monotonic() + 120
            while not reqs[-1][1].finish_reason:
                assert time.monotonic() < deadline, "timed out"
                time.sleep(0.01)
    finally:
        sch.stop()
        model.backend.close()
    eos = set(model.tokenizer.eos_token_ids)
    for prompt, r in reqs:
        want = [t for t in resident.generate(prompt, max_new_tokens=20, speculative=False).token_ids if t not in eos]
        assert r.completion_ids == want, prompt
    assert service.state.metrics.spec_steps > 0 and service.state.metrics.spec_accepted > 0
