"""Memory manager: block pool invariants (parametrized over sizes), layout, admission, idle release."""

from __future__ import annotations

import random

import pytest

from edge_sdk.errors import MemoryBudgetError
from edge_sdk.runtime.server.memory import (
    BlockAllocator, MemoryBusyError, MemoryLayout, MemoryManager, NoFreeBlocksError, RequestTooLargeError, plan_layout,
    process_rss_bytes,
)

MIB = 2**20


@pytest.mark.parametrize("num_blocks", [0, 1, 7, 64, 1000])
def test_allocator_invariants_under_random_traffic(num_blocks):
    pool = BlockAllocator(num_blocks)
    rng = random.Random(num_blocks)
    held: list[list[int]] = []
    for _ in range(500):
        if held and rng.random() < 0.45:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(0, max(1, num_blocks // 4))
            if n > pool.num_free:
                with pytest.raises(NoFreeBlocksError):
                    pool.allocate(n)
            else:
                held.append(pool.allocate(n))
        flat = [b for blocks in held for b in blocks]
        assert len(flat) == len(set(flat)) == pool.num_used  # no block handed out twice
        assert pool.num_used + pool.num_free == num_blocks
        assert all(0 <= b < num_blocks for b in flat)
    for blocks in held:
        pool.free(blocks)
    assert pool.num_free == num_blocks


def test_double_free_is_an_invariant_violation():
    pool = BlockAllocator(4)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(AssertionError):
        pool.free(blocks)


@pytest.mark.parametrize("board_mb,weights_mb,expect_blocks", [
    # budget - reserve - weights - workspace, in 16-token blocks of 16 KiB/token (256 KiB per block)
    (62841, 1000, (62841 - 1024 - 1000 - 100) * 4),
    (7620, 4000, (7620 - 1024 - 4000 - 100) * 4),
])
def test_layout_splits_the_budget(board_mb, weights_mb, expect_blocks):
    lay = plan_layout(budget_bytes=board_mb * MIB, reserve_bytes=1024 * MIB, weights_bytes=weights_mb * MIB,
                      workspace_bytes=100 * MIB, kv_bytes_per_token=16384, kv_block_tokens=16, context_length=4096)
    assert lay.kv_blocks == expect_blocks and lay.kv_block_bytes == 16 * 16384
    assert lay.weights_bytes + lay.workspace_bytes + lay.kv_pool_bytes <= lay.usable_bytes
    assert lay.usable_bytes - (lay.weights_bytes + lay.workspace_bytes + lay.kv_pool_bytes) < lay.kv_block_bytes


def test_layout_respects_pool_cap_and_refuses_a_model_that_cannot_hold_one_sequence():
    lay = plan_layout(budget_bytes=8000 * MIB, reserve_bytes=0, weights_bytes=0, workspace_bytes=0, kv_bytes_per_token=1024,
                      kv_block_tokens=16, context_length=64, kv_pool_max_bytes=10 * 16 * 1024)
    assert lay.kv_blocks == 10
    with pytest.raises(MemoryBudgetError, match="needs .* MiB .* budget is 7620 MiB"):
        plan_layout(budget_bytes=7620 * MIB, reserve_bytes=1024 * MIB, weights_bytes=6500 * MIB, workspace_bytes=100 * MIB,
                    kv_bytes_per_token=57344, kv_block_tokens=16, context_length=4096)


def manager(blocks=10, block_tokens=16, context=1024):
    lay = MemoryLayout(budget_bytes=1 << 30, reserve_bytes=0, weights_bytes=100, workspace_bytes=10,
                       kv_block_tokens=block_tokens, kv_block_bytes=block_tokens * 8, kv_blocks=blocks)
    return MemoryManager(lay, context_length=context)


def test_admission_reserves_whole_requests_and_frees_them():
    m = manager()
    m.reserve("a", 20, 40)  # 60 tokens -> 4 blocks
    m.reserve("b", 1, 15)  # 16 tokens -> 1 block
    assert m.stats()["kv_blocks_used"] == 5
    assert m.stats()["accounted_bytes"] == 110 + 5 * 16 * 8
    with pytest.raises(MemoryBusyError, match="5 of 10 blocks free"):
        m.reserve("c", 50, 50)  # 7 blocks
    m.release("a")
    m.reserve("c", 50, 50)
    m.release("b")
    m.release("c")
    m.release("c")  # releasing twice is harmless
    assert m.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("prompt,new,kind", [(1000, 25, "context"), (100, 100, "blocks")])
def test_requests_that_can_never_fit_are_too_large(prompt, new, kind):
    m = manager(blocks=10, context=1024)  # the pool holds 160 tokens, less than the context
    with pytest.raises(RequestTooLargeError, match=kind):
        m.reserve("x", prompt, new)
    assert m.stats()["kv_blocks_used"] == 0


def test_process_rss_matches_psutil():
    psutil = pytest.importorskip("psutil")
    ours, theirs = process_rss_bytes(), psutil.Process().memory_info().rss
    assert abs(ours - theirs) < 8 * MIB


MEMINFO = """MemTotal:       64349340 kB
MemFree:        40203664 kB
MemAvailable:   55111044 kB
SwapTotal:      32174656 kB
SwapFree:       32174656 kB
NvMapMemFree:      45952 kB
NvMapMemUsed:    2764608 kB
"""


def test_budget_under_a_board_root(tmp_path):
    from edge_sdk.runtime.server import budget

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text(MEMINFO)
    # host_used = (64349340 - 40203664) - 2764608 kB < SwapFree: MemTotal - NvMapMemUsed
    assert budget.memory_budget_bytes(str(tmp_path), None)[0] == (64349340 - 2764608) * 1024
    with pytest.raises(Exception, match="meminfo"):
        budget.memory_budget_bytes(str(tmp_path / "empty"), None)


def test_power_mode_is_read_from_nvpmodel_status_under_the_root(tmp_path):
    from edge_sdk.runtime.server.budget import power_mode_reader

    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    status = tmp_path / "var" / "lib" / "nvpmodel" / "status"
    status.parent.mkdir(parents=True)
    status.write_text("pmode:0003\n")
    read = power_mode_reader(str(tmp_path), None)
    assert read() == "MODE_50W"
    status.write_text("pmode:0001\n")
    assert read() == "MODE_15W"
    assert power_mode_reader(str(tmp_path / "elsewhere"), None)() is None


@pytest.mark.parametrize("blocks", [4, 16, 100])
def test_padding_keeps_the_pool_equal_to_what_the_model_holds(blocks):
    """Random reserve / hold / settle / release with a model-reported held size: the pool always counts
    max(held, reservations), rounded up to one block, and never more blocks than it has."""
    m = manager(blocks=blocks)
    block = m.layout.kv_block_bytes
    rng = random.Random(blocks)
    live: list[str] = []
    for i in range(400):
        held = rng.randint(0, blocks * block)
        op = rng.choice(["reserve", "hold", "settle", "release"])
        try:
            if op == "reserve":
                m.reserve(f"r{i}", rng.randint(1, 20), rng.randint(1, 20), held_bytes=held)
                live.append(f"r{i}")
            elif op == "hold":
                m.hold(held)
            elif op == "settle":
                m.settle(held)
            elif live:
                m.release(live.pop(rng.randrange(len(live))), held_bytes=held)
            else:
                continue
        except MemoryBusyError:
            continue
        s = m.stats()
        reserved = s["kv_blocks_used"] - s["kv_blocks_padding"]
        assert s["kv_blocks_used"] <= blocks and s["reservations"] == len(live)
        if op in ("reserve", "settle", "release"):  # set exactly (hold only grows)
            assert s["kv_blocks_padding"] == max(0, -(-(held - reserved * block) // block))
    for r in live:
        m.release(r)
    m.settle(0)  # the model let its batch go
    assert m.stats()["kv_blocks_used"] == 0 and m.stats()["kv_blocks_peak"] <= blocks
