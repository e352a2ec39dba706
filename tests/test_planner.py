"""Planner: bytes at int4, verdicts at the edges, roofline per power mode, paging estimate."""

import pytest

from edge_sdk.boards import board_names, get_board
from edge_sdk.errors import ConfigError, PowerModeError, UnknownBoardError
from edge_sdk.planner import DECODE_EFFICIENCY, OS_RESERVE_MB, QuantSpec, plan, recommend, render


def test_int4_matrix_bytes_by_hand():
    q = QuantSpec()
    # [512, 256] at int4: 256*512/2 packed bytes + (256/128 groups) * 512 fp16 scales
    assert q.matrix_bytes(256, 512) == 256 * 512 // 2 + 2 * 512 * 2
    # a partial last group still carries a scale
    assert q.matrix_bytes(200, 10) == 200 * 10 // 2 + 2 * 10 * 2
    assert q.matrix_bytes(256, 512, "fp16") == 256 * 512 * 2


def test_qwen_1_5b_weight_bytes_by_hand():
    p = plan("deepseek-r1-distill-qwen-1.5b", "agx-orin-64gb")
    h, v, i, L = 1536, 151936, 8960, 28

    def int4(inp, out):
        return inp * out // 2 + -(-inp // 128) * out * 2

    attn = int4(h, h) * 2 + int4(h, 256) * 2 + (h + 2 * 256) * 2
    mlp = int4(h, i) * 2 + int4(i, h)
    expected = v * h * 2 + int4(h, v) + L * (attn + mlp + 2 * h * 2) + h * 2
    assert p.weight_bytes["total"] == expected
    assert p.kv_bytes == 28672 * 4096
    # a decode step reads every weight except all-but-one embedding rows, plus the KV cache
    assert p.bytes_read_per_token == expected - (v - 1) * h * 2 + 28672 * 4096


def test_decode_roofline_follows_the_emc_cap():
    p = plan("deepseek-r1-distill-qwen-1.5b", "agx-orin-64gb", context=1024)
    by_name = {m.mode: m for m in p.modes}
    assert by_name["MAXN"].decode_bound_tokens_per_s == pytest.approx(204.8e9 / p.bytes_read_per_token, rel=1e-3)
    # MODE_15W caps EMC at 2133 of 3199 MHz
    assert by_name["MODE_15W"].decode_bound_tokens_per_s == pytest.approx(204.8e9 * 2133 / 3199 / p.bytes_read_per_token, rel=1e-3)
    for m in p.modes:  # the estimate is the published efficiency's share of the bound
        assert m.decode_tokens_per_s == pytest.approx(DECODE_EFFICIENCY * m.decode_bound_tokens_per_s, rel=1e-3)
    assert by_name["MODE_15W"].joules_per_token == pytest.approx(15 / by_name["MODE_15W"].decode_tokens_per_s, rel=1e-2)


def test_fits_large_board_but_not_small_one_with_numbers():
    big = plan("deepseek-r1-distill-qwen-14b", "agx-orin-64gb")
    small = plan("deepseek-r1-distill-qwen-14b", "orin-nano-8gb")
    assert big.fits and not small.fits
    assert small.total_bytes == big.total_bytes  # same model, same settings: only the board differs
    assert small.usable_bytes == (7620 - OS_RESERVE_MB) * 2**20
    text = render(small)
    assert "DOES NOT FIT" in text and f"{small.total_bytes / 2**30:.2f} GiB" in text
    assert small.paged["feasible"] and small.paged["paged_layers"] > 0


def test_verdict_flips_exactly_at_the_memory_edge():
    """Find the longest context that fits; one more token of KV cache must not fit."""
    board = "orin-nano-8gb"
    lo, hi = 1, 200_000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan("deepseek-r1-distill-qwen-7b", board, context=mid, prefill_chunk=1).fits:
            lo = mid
        else:
            hi = mid - 1
    fits = plan("deepseek-r1-distill-qwen-7b", board, context=lo, prefill_chunk=1)
    over = plan("deepseek-r1-distill-qwen-7b", board, context=lo + 1, prefill_chunk=1)
    assert fits.fits and not over.fits
    assert fits.headroom_bytes < fits.kv_bytes_per_token + (over.workspace_bytes - fits.workspace_bytes) + 1
    assert over.kv_bytes - fits.kv_bytes == fits.kv_bytes_per_token


def test_batch_scales_kv_and_throughput():
    one = plan("deepseek-r1-distill-llama-8b", "agx-orin-64gb", context=2048, batch=1)
    four = plan("deepseek-r1-distill-llama-8b", "agx-orin-64gb", context=2048, batch=4)
    assert four.kv_bytes == 4 * one.kv_bytes
    # weights are read once per step for the whole batch
    assert four.modes[0].decode_tokens_per_s > 2 * one.modes[0].decode_tokens_per_s


def test_moe_reads_only_active_experts():
    p = plan("deepseek-v2-lite-chat", "agx-orin-64gb")
    assert p.bytes_read_per_token < p.weight_bytes["total"] / 3


def test_paged_estimate_is_storage_bound():
    p = plan("deepseek-r1-distill-llama-70b", "agx-orin-32gb", storage="emmc")
    assert not p.fits
    pg = p.paged
    assert pg["decode_tokens_per_s"] == pytest.approx(300e6 / pg["bytes_paged_per_token"], rel=1e-3)


def test_recommend_lists_fitting_boards_fastest_first():
    rows = recommend("deepseek-r1-distill-qwen-14b", context=4096)
    boards = {p.board for p, _ in rows}
    assert "agx-orin-64gb" in boards and "orin-nano-8gb" not in boards
    speeds = [m.decode_tokens_per_s for _, m in rows]
    assert speeds == sorted(speeds, reverse=True)


def test_bad_arguments_name_the_valid_range():
    with pytest.raises(UnknownBoardError, match="agx-orin-64gb"):
        plan("deepseek-r1-distill-qwen-1.5b", "orin-agx")
    with pytest.raises(PowerModeError, match="MODE_30W"):
        plan("deepseek-r1-distill-qwen-1.5b", "agx-orin-64gb", mode="TURBO")
    with pytest.raises(ConfigError, match="group_size"):
        plan("deepseek-r1-distill-qwen-1.5b", "agx-orin-64gb", group_size=100)
    with pytest.raises(ConfigError, match="bundled configs"):
        plan("no-such-model", "agx-orin-64gb")


@pytest.mark.parametrize("board", board_names())
def test_every_board_profile_is_consistent(board):
    b = get_board(board)
    assert sum(m.default for m in b.power_modes) == 1
    assert sorted(m.id for m in b.power_modes) == list(range(len(b.power_modes)))
    assert b.mem_total_mb < b.memory_gb * 1024
    for m in b.power_modes:
        assert 0 < b.mode_bandwidth_gbps(m) <= b.bandwidth_gbps
        assert m.cores_online <= b.cpu["cores"]
    assert b.default_storage in b.storage


def test_decode_estimate_is_labelled_beside_its_bound():
    text = render(plan("deepseek-r1-distill-qwen-1.5b", "agx-orin-64gb"))
    assert "bound tok/s  decode tok/s" in text and f"{DECODE_EFFICIENCY:.0%} of the bound" in text
    assert 0.5 < DECODE_EFFICIENCY < 1


def test_a_model_that_does_not_fit_shows_the_paged_speed_only():
    p = plan("deepseek-r1-distill-qwen-14b", "orin-nano-8gb")
    assert not p.fits and p.paged["feasible"]
    for m in p.modes:
        assert m.decode_tokens_per_s == m.paged_decode_tokens_per_s <= m.decode_bound_tokens_per_s
        assert m.joules_per_token == pytest.approx(m.budget_w / m.decode_tokens_per_s, rel=1e-2)
    rows = [ln for ln in render(p).splitlines() if ln[2:3].isdigit()]
    assert len(rows) == len(p.modes)
    for m, row in zip(p.modes, rows):  # one speed per row: the paged one, not the in-memory bound
        assert f"{m.decode_tokens_per_s:.3g}" in row and f"{m.decode_bound_tokens_per_s:.1f}" not in row


def test_a_model_that_cannot_run_at_all_expects_nothing():
    p = plan("deepseek-r1-distill-llama-70b", "orin-nano-8gb", context=32768)  # the KV cache alone exceeds the memory
    assert not p.fits and not p.paged["feasible"]
    assert all(m.decode_tokens_per_s == 0 and m.joules_per_token == float("inf") for m in p.modes)
    assert all(ln.split()[6] == "-" for ln in render(p).splitlines() if ln[2:3].isdigit())


@pytest.mark.parametrize("model, board", [("deepseek-r1-distill-qwen-1.5b", "agx-orin-64gb"),
                                          ("deepseek-r1-distill-qwen-14b", "orin-nano-8gb")])
def test_memory_is_printed_in_binary_units_and_rates_in_decimal(model, board):
    import re

    text = render(plan(model, board))
    assert re.findall(r"\d (?:GB|MB)\b(?!/s)", text) == []  # sizes: GiB/MiB; bandwidth: GB/s
    assert " GiB" in text and " GB/s" in text
