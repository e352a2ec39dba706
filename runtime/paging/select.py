"""Decide whether a bundle runs paged: explicit `memory_budget` (bytes or percent of the weights), or
under a board (emulated or named) what its memory plan leaves for weights. Storage speed under
emulation follows the board's storage profile; on a real device it is whatever the disk gives."""

from __future__ import annotations

import logging

from .backend import EMBED, PagingOptions, fixed_bytes, layer_table
from edge_sdk.paging_model import page_round, parse_budget

log = logging.getLogger("edge_sdk.runtime")


def weight_bytes(manifest: dict) -> int:
    return sum(int(t["nbytes"]) for t in manifest.get("weights", {}).get("tensors", {}).values())


def resident_bytes(manifest: dict) -> int:
    """Memory a paging-capable executor needs to hold every layer (embeddings are read by row)."""
    return fixed_bytes(manifest) + sum(page_round(n) for _, n in layer_table(manifest))


def board_weights_budget(manifest: dict, board: str, context: int, batch: int) -> int | None:
    config = manifest.get("source", {}).get("config")
    if not config:
        return None
    from edge_sdk.planner import plan

    p = plan(config, board, context=context, batch=batch)
    return max(0, p.usable_bytes - p.kv_bytes - p.workspace_bytes - p.runtime_overhead_bytes)


def paging_options(manifest: dict, options) -> PagingOptions | None:
    """PagingOptions when the weights do not fit the budget, else None (run resident)."""
    weights = manifest.get("weights") or {}
    if not weights.get("layers") or EMBED not in weights.get("tensors", {}):
        return None
    budget = getattr(options, "memory_budget", None)
    board = options.target_board
    if budget is not None:
        budget = parse_budget(budget, weight_bytes(manifest))
    elif board:
        budget = board_weights_budget(manifest, board, options.max_seq_len or 4096, options.max_batch)
    if budget is None or weight_bytes(manifest) <= budget:
        return None
    read_bps = None
    if options.emulate:
        from edge_sdk.boards import get_board

        b = get_board(options.emulate)
        read_bps = b.storage[b.default_storage].read_mbps * 1e6
    log.info("paging: the weights (%s bytes) exceed the memory budget (%s bytes): streaming layers from storage%s",
             f"{weight_bytes(manifest):,}", f"{budget:,}",
             f" at the emulated board's {read_bps / 1e6:.0f} MB/s" if read_bps else "")
    return PagingOptions(budget, read_bps)
