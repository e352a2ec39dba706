"""Sampling: each filter against hand-computed values, seeds, and the drawn distribution."""

import numpy as np
import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.runtime.generate.sampling import (Sampler, SamplingParams, apply_repetition_penalty, filter_top_k, filter_top_p,
                                       softmax)


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], np.float32)
    assert Sampler(SamplingParams())(logits, np.array([], np.int64)) == 1


def test_repetition_penalty_divides_positive_multiplies_negative():
    out = apply_repetition_penalty(np.array([2.0, -1.0, 0.5]), np.array([0, 1, 1]), 2.0)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5])


def test_repetition_penalty_changes_greedy_choice():
    logits = np.array([2.0, 1.5, 0.0])
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, np.array([0])) == 1


def test_top_k_keeps_k_largest():
    out = filter_top_k(np.array([1.0, 4.0, 3.0, 2.0]), 2)
    assert np.isneginf(out[[0, 3]]).all() and list(out[[1, 2]]) == [4.0, 3.0]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    out = filter_top_p(np.log(probs), 0.75)
    # sorted: 0.5, 0.3 (cum 0.8) reach p=0.75; 0.15 and 0.05 are dropped
    assert list(np.isfinite(out)) == [False, True, False, True]
    # always at least one token
    assert np.isfinite(filter_top_p(np.log(probs), 0.01)).sum() == 1


def test_temperature_scales_distribution():
    logits = np.array([1.0, 2.0, 3.0])
    p = Sampler(SamplingParams(temperature=2.0)).probabilities(logits, np.array([], np.int64))
    ref = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum()
    np.testing.assert_allclose(p, ref, rtol=1e-12)


def test_probabilities_combine_filters_in_hf_order():
    logits = np.array([3.0, 2.0, 1.0, 0.0, -1.0])
    p = Sampler(SamplingParams(temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=2.0)).probabilities(logits, np.array([0]))
    # penalty: [1.5, 2, 1, 0, -1] -> /0.5: [3, 4, 2, 0, -2] -> top-3: [3, 4, 2] -> top-p 0.9 on softmax([4,3,2])
    s = softmax(np.array([4.0, 3.0, 2.0]))  # 0.665, 0.245, 0.090: first two reach 0.91 >= 0.9
    ref = np.zeros(5)
    ref[[1, 0]] = s[:2] / s[:2].sum()
    np.testing.assert_allclose(p, ref, rtol=1e-12)


def test_seeded_sampling_reproducible_and_seed_dependent():
    logits = np.zeros(1000)
    draw = lambda seed: [Sampler(SamplingParams(temperature=1.0, seed=seed))(logits, np.array([], np.int64)) for _ in range(1)]
    s1 = Sampler(SamplingParams(temperature=1.0, seed=7))
    s2 = Sampler(SamplingParams(temperature=1.0, seed=7))
    s3 = Sampler(SamplingParams(temperature=1.0, seed=8))
    a = [s1(logits, np.array([], np.int64)) for _ in range(20)]
    assert a == [s2(logits, np.array([], np.int64)) for _ in range(20)]
    assert a != [s3(logits, np.array([], np.int64)) for _ in range(20)]
    assert draw(1) == draw(1)


def test_drawn_frequencies_follow_probabilities():
    probs = np.array([0.5, 0.3, 0.2])
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = np.bincount([s(np.log(probs), np.array([], np.int64)) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, probs, atol=0.03)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(repetition_penalty=0)])
def test_bad_settings_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kw", [dict(top_p=0.9), dict(top_p=0.999), dict(top_k=50), dict(top_k=1000, top_p=0.3),
                                dict(top_p=0.5, repetition_penalty=1.3), dict()])
def test_candidate_distribution_equals_full_sort_reference(kw):
    """The partial-sort fast path gives the same distribution as filtering the whole vocabulary."""
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(151936) * 3).astype(np.float32)
    prev = rng.integers(0, 151936, 300)
    params = SamplingParams(temperature=0.7, **kw)
    x = apply_repetition_penalty(logits.astype(np.float64), prev, params.repetition_penalty) / params.temperature
    ref = softmax(filter_top_p(filter_top_k(x, params.top_k), params.top_p))
    np.testing.assert_allclose(Sampler(params).probabilities(logits, prev), ref, rtol=1e-9, atol=1e-15)
