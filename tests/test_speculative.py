"""Speculative decoding: greedy output equal to plain greedy (prompt lookup and a draft model, fused and
standard graphs), rejection sampling distributed as the target (chi-square at fixed seeds), KV rollback,
and the one-line refusals."""

import numpy as np
import pytest

from edge_sdk.errors import ConfigError
from runtime.backends.kv_cache import KVCache, ModelIO, SharedKVCache
from runtime.generate.sampling import Sampler, SamplingParams
from runtime.generate.speculative import PromptLookup, SpeculativeConfig, check_draft, verify_pick

# chi-square critical values at p = 0.001 by degrees of freedom (a wrong sampler fails far above them)
CHI2_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877,
            10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528, 14: 36.123, 15: 37.697, 16: 39.252, 17: 40.790,
            18: 42.312, 19: 43.820, 20: 45.315}
PROMPTS = ["Hello world, hello world, hello", "the cat sat on the mat. the cat sat on", "a b c a b c a b", "x",
           "def f(x):\n    return x + 1\n\ndef g(x):\n    return", "1 2 3 4 5 1 2 3 4 5 1 2", "Once upon a time"]
IO = ModelIO(num_layers=1, num_kv_heads=2, head_dim=3, vocab_size=10, max_positions=64)


def _fill(cache, new):
    """What a backend step does to the cache: write `present` (values = position) and advance."""
    for kind in range(2):
        t = cache.present_target(0, kind, new)
        t[...] = np.arange(t.shape[2], dtype=np.float32)[None, None, :, None] + 100 * kind
    cache.advance(np.ones((cache.batch, new), np.int64))


@pytest.mark.parametrize("cls", [KVCache, SharedKVCache])
@pytest.mark.parametrize("back", [0, 1, 3, 5])
def test_rollback_keeps_the_first_positions(cls, back):
    c = cls(IO, 1, 16)
    _fill(c, 4)
    _fill(c, 5)
    c.rollback(9 - back)
    assert c.length == 9 - back
    for kind in range(2):
        assert np.array_equal(c.past(0, kind)[0, :, :, 0], np.tile(np.arange(9 - back) + 100 * kind, (2, 1)))
    _fill(c, 2)  # the next step continues from the kept length
    assert c.length == 11 - back and np.array_equal(c.past(0, 1)[0, 1, :, 0], np.arange(11 - back) + 100)


def test_shared_rollback_does_not_copy():
    c = SharedKVCache(IO, 1, 16)
    _fill(c, 6)
    before = c.buffers[0][0][0].copy()
    c.rollback(2)
    assert np.array_equal(c.buffers[0][0][0], before) and c.length == 2


def test_rollback_past_the_length_is_refused():
    c = KVCache(IO, 1, 8)
    _fill(c, 3)
    with pytest.raises(ConfigError):
        c.rollback(4)


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    pl = PromptLookup(SpeculativeConfig(prompt_lookup=True, ngram=2))
    assert pl.propose([1, 2, 3, 4, 9, 2, 3], 3)[0] == [4, 9, 2]
    assert pl.propose([1, 2, 3, 4, 5, 1, 2, 3, 7, 3], 2)[0] == [7, 3]  # latest occurrence of the 1-gram (3)
    assert pl.propose([5, 6, 7], 4)[0] == []


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=-2), dict(k_max=0), dict(ngram=0), dict(k=100), dict(ngram=2, ngram_min=3)])
def test_bad_settings_are_one_line(bad):
    with pytest.raises(ConfigError) as e:
        SpeculativeConfig(**bad)
    assert "\n" not in str(e.value)


def _chi2_two_sample(a: dict, b: dict) -> tuple[float, int]:
    """Chi-square statistic of two equal-size samples of categories (rare ones pooled), and its dof."""
    keys = sorted(set(a) | set(b))
    big = [k for k in keys if a.get(k, 0) + b.get(k, 0) >= 10]
    rest = [k for k in keys if k not in big]
    rows = [(a.get(k, 0), b.get(k, 0)) for k in big] + [(sum(a.get(k, 0) for k in rest), sum(b.get(k, 0) for k in rest))]
    rows = [(x, y) for x, y in rows if x + y > 0]
    return sum((x - y) ** 2 / (x + y) for x, y in rows), len(rows) - 1


@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sampling_draws_from_the_target(point_mass):
    rng = np.random.default_rng(0)
    p_logits = rng.normal(size=8) * 1.5
    q = np.full(8, 1 / 8) if not point_mass else None
    q = np.array([0.4, 0.05, 0.05, 0.2, 0.1, 0.1, 0.05, 0.05]) if not point_mass else None
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1))
    p = sampler.probabilities(p_logits, np.zeros(0, np.int64))
    n, counts = 20000, np.zeros(8)
    for _ in range(n):
        draft = int(rng.choice(8, p=q)) if q is not None else 3
        counts[verify_pick(sampler, np.zeros(0, np.int64), draft, q)(p_logits)] += 1
    stat = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert stat < CHI2_001[7], (counts / n, p)


def test_rejection_sampling_test_catches_a_biased_sampler():
    """The statistic above does reject a sampler that always keeps the draft."""
    p = Sampler(SamplingParams(temperature=1.0)).probabilities(np.random.default_rng(0).normal(size=8) * 1.5, np.zeros(0, np.int64))
    q = np.array([0.4, 0.05, 0.05, 0.2, 0.1, 0.1, 0.05, 0.05])
    n = 20000
    counts = np.bincount(np.random.default_rng(2).choice(8, size=n, p=q), minlength=8)
    assert float(((counts - n * p) ** 2 / (n * p)).sum()) > CHI2_001[7]


# --- on a converted tiny bundle -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(request):
    import edge_sdk

    bundle = request.getfixturevalue("tiny_bundle")("qwen2")
    fused = edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1, graph="fused")
    standard = edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1, graph="standard")
    return fused, standard


class _Skewed:
    """A draft backend that is another backend with a fixed bias on its logits: a draft that disagrees
    with the target often, so both branches of the rejection step run."""

    def __init__(self, backend, scale=0.5):
        self.inner, self.io, self.provider = backend, backend.io, backend.provider
        self.kv_copies = getattr(backend, "kv_copies", 2)
        self.bias = np.random.default_rng(5).normal(size=backend.io.vocab_size).astype(np.float32) * scale

    def new_cache(self, batch, capacity):
        return self.inner.new_cache(batch, capacity)

    def forward(self, ids, cache, new_mask=None):
        return self.inner.forward(ids, cache, new_mask) + self.bias


def _with_draft(model, draft, skew=False):
    """Speculate with `draft` without the size check (the tests' draft is the same bundle on the other
    graph form, optionally skewed)."""
    model.draft, model.generator.draft = draft, (_Skewed(draft.backend) if skew else draft.backend)
    return model


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("spec", ["prompt-lookup", {"prompt_lookup": True, "k": 2, "ngram": 1}, {"k": 3}, {"k": 1, "adaptive": False}])
@pytest.mark.parametrize("skew", [False, True])
def test_greedy_is_identical(models, which, spec, skew):
    model, other = models[which], models[1 - which]
    if not (isinstance(spec, str) or spec.get("prompt_lookup")):
        _with_draft(model, other, skew)
    proposed = 0
    try:
        for prompt in PROMPTS:
            plain = model.generate(prompt, max_new_tokens=24, speculative=False)
            fast = model.generate(prompt, max_new_tokens=24, speculative=spec)
            proposed += fast.timings.spec_proposed
            assert fast.token_ids == plain.token_ids and fast.text == plain.text and fast.finish_reason == plain.finish_reason
    finally:
        model.draft = model.generator.draft = None
    assert proposed > 0


def test_stop_strings_and_token_limit_still_apply(models):
    model = models[0]
    prompt = "a b c a b c a b"
    plain = model.generate(prompt, max_new_tokens=5, speculative=False)
    fast = model.generate(prompt, max_new_tokens=5, speculative="prompt-lookup")
    assert fast.token_ids == plain.token_ids and len(fast.token_ids) <= 5
    stop = plain.text[2:4] or plain.text[:1]
    a = model.generate(prompt, max_new_tokens=20, stop=[stop], speculative=False)
    b = model.generate(prompt, max_new_tokens=20, stop=[stop], speculative="prompt-lookup")
    assert (a.text, a.finish_reason) == (b.text, b.finish_reason)


def test_sampling_matches_plain_sampling(models):
    """Frequencies of the 3rd and 4th generated tokens, speculative vs plain, over fixed seeds."""
    model = models[0]
    _with_draft(model, models[1], skew=True)
    kw = dict(max_new_tokens=4, temperature=0.5, top_k=3)
    base = "a b c a b"
    prompt = base + model.generate(base, max_new_tokens=8).text + base  # lookup then proposes likely tokens
    try:
        for spec in ("prompt-lookup", {"k": 3}):
            plain, fast, proposed, accepted = {}, {}, 0, 0
            for seed in range(300):
                a = model.generate(prompt, seed=seed, speculative=False, **kw).token_ids
                b = model.generate(prompt, seed=10_000 + seed, speculative=spec, **kw)
                proposed, accepted = proposed + b.timings.spec_proposed, accepted + b.timings.spec_accepted
                for key, ids in ((plain, a), (fast, b.token_ids)):
                    key[tuple(ids[2:4])] = key.get(tuple(ids[2:4]), 0) + 1
            stat, dof = _chi2_two_sample(plain, fast)
            assert 0 < accepted < proposed  # both branches of the rejection step ran
            assert stat < CHI2_001[min(dof, 20)], (spec, stat, dof)
    finally:
        model.draft = model.generator.draft = None


def test_refusals_are_one_line(models):
    model = models[0]
    for bad, text in (({"k": 0}, "k must be"), ("draft", "needs one loaded"), (3, "speculative must be")):
        with pytest.raises(ConfigError, match=text) as e:
            model.generate("hi", speculative=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="one prompt at a time"):
        model.generate(["a", "b"], speculative="prompt-lookup")
    with pytest.raises(ConfigError, match="not smaller than the target"):
        check_draft(models[0], models[1])  # the same bundle: not a smaller model


def test_a_backend_that_cannot_roll_back_is_refused(models):
    model = models[0]
    model.backend.can_rollback = False
    try:
        with pytest.raises(ConfigError, match="speculation needs a backend that can roll back its cache"):
            model.generate("hi", speculative="prompt-lookup")
    finally:
        del model.backend.can_rollback


def test_a_different_tokenizer_is_refused(models):
    class Other:
        manifest = models[1].manifest

        class tokenizer:
            eos_token_ids = models[1].tokenizer.eos_token_ids

            @staticmethod
            def vocab():
                v = dict(models[1].tokenizer.vocab())
                v["zz-not-in-target"] = len(v)
                return v

    with pytest.raises(ConfigError, match="tokenizer differs") as e:
        check_draft(models[0], Other)
    assert "zz-not-in-target" in str(e.value)
