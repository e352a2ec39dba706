"""Planner with a draft model: expected speculative speedup per mode by acceptance rate, by hand."""

import json

import pytest

from edge_sdk.cli.main import main
from edge_sdk.errors import ConfigError
from edge_sdk.planner import (
    SPEC_K_MAX,
    VERIFY_TOKEN_COST,
    expected_tokens,
    plan,
    render,
    speculative_speedup,
)

T14, D15, D7 = "deepseek-r1-distill-qwen-14b", "deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-7b"


def test_expected_accepted_length_by_hand():
    assert expected_tokens(0.8, 4) == pytest.approx((1 - 0.32768) / 0.2)  # 3.3616
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert expected_tokens(0.0, 5) == 1.0  # the target's own token only
    assert expected_tokens(1.0, 5) == 6.0  # every draft token plus the target's
    with pytest.raises(ConfigError):
        expected_tokens(1.5, 2)


def test_speedup_counts_verify_and_draft_reads():
    # 3.3616 tokens per (a 1.2-step verify + 4 draft steps of 0.1) = 3.3616 / 1.6
    assert speculative_speedup(0.8, 4, 0.1, 1.2) == pytest.approx(2.101)
    # a draft as slow as the target never pays: at a = 0.5, k = 1: 1.5 / (1.04 + 1)
    assert speculative_speedup(0.5, 1, 1.0, 1.04) == pytest.approx(1.5 / 2.04)


def test_plan_with_draft_by_hand():
    p = plan(T14, "agx-orin-64gb", context=1024, draft=D15)
    d = plan(D15, "agx-orin-64gb", context=1024)
    ratio = d.bytes_read_per_token / p.bytes_read_per_token  # same bandwidth and efficiency: time ratio = bytes ratio
    maxn = next(m for m in p.speculative["modes"] if m["mode"] == "MAXN")
    assert maxn["draft_step_ratio"] == pytest.approx(ratio, abs=1e-4)
    by_a = {r["acceptance"]: r for r in maxn["rows"]}
    # a = 0.7: speedup(k) = E(0.7, k) / (1 + 0.04 k + k * ratio); the best k is its argmax over 1..8
    hand = {k: (1 - 0.7 ** (k + 1)) / 0.3 / (1 + VERIFY_TOKEN_COST * k + k * ratio) for k in range(1, SPEC_K_MAX + 1)}
    k = max(hand, key=hand.get)
    assert by_a[0.7]["k"] == k and by_a[0.7]["speedup"] == pytest.approx(hand[k], abs=1e-3)
    assert by_a[0.7]["decode_tokens_per_s"] == pytest.approx(maxn["base_decode_tokens_per_s"] * hand[k], rel=1e-3)
    assert all(r["pays"] for r in maxn["rows"])
    assert p.speculative["extra_bytes"] == d.weight_bytes["total"] + d.kv_bytes + d.workspace_bytes
    assert p.speculative["fits_with_draft"]
    # the plan without a draft is unchanged by asking for one
    assert plan(T14, "agx-orin-64gb", context=1024).to_dict() == {**p.to_dict(), "speculative": None}


def test_a_heavy_draft_does_not_pay_at_low_acceptance_and_says_so():
    p = plan(T14, "agx-orin-64gb", context=1024, draft=D7)
    maxn = next(m for m in p.speculative["modes"] if m["mode"] == "MAXN")
    low = maxn["rows"][0]
    r = maxn["draft_step_ratio"]  # about half a target step
    assert low["acceptance"] == 0.5 and low["k"] == 1
    assert low["speedup"] == pytest.approx(1.5 / (1 + VERIFY_TOKEN_COST + r), abs=1e-3) and low["speedup"] < 1
    assert not low["pays"]
    # break-even: the lowest acceptance (in 0.01 steps) with a speedup over 1 at some k
    pf = maxn["pays_from_acceptance"]
    best = lambda a: max(speculative_speedup(a, k, r, 1 + VERIFY_TOKEN_COST * k) for k in range(1, SPEC_K_MAX + 1))  # noqa: E731
    assert best(pf) > 1 >= best(round(pf - 0.01, 2))
    assert "speculation does not pay" in render(p)


def test_draft_larger_than_target_is_refused():
    with pytest.raises(ConfigError, match="not smaller than the target"):
        plan(D15, "agx-orin-64gb", draft=D7)


def test_cli_plan_draft_json_and_text(capsys):
    assert main(["plan", T14, "--draft", D15, "--board", "agx-orin-64gb", "--context", "1024", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["speculative"] == plan(T14, "agx-orin-64gb", context=1024, draft=D15).speculative
    assert main(["plan", T14, "--draft", D15, "--board", "orin-nano-8gb"]) == 0
    text = capsys.readouterr().out
    assert "speculative decoding with draft" in text and "DOES NOT FIT beside the target" in text


def test_recommend_with_a_draft_is_refused_not_ignored(capsys):
    assert main(["plan", T14, "--draft", D15, "--recommend"]) != 0
    assert "--recommend does not take --draft" in capsys.readouterr().err
