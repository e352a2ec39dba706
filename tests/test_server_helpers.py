"""Shared pieces of the daemon tests: a deterministic step model and an in-process HTTP server.

The fake model is for scheduler/HTTP unit tests only (end-to-end tests run a real bundle). Its next
token is a pure function of the sequence so far, so any output can be recomputed independently.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from edge_sdk.runtime.server.api import ServerState, create_app
from edge_sdk.runtime.server.memory import MemoryManager, plan_layout
from edge_sdk.runtime.server.metrics import Metrics
from edge_sdk.runtime.server.scheduler import Scheduler

EOS = 256
VOCAB = 257


def next_token(history: list[int]) -> int:
    """Reference rule: lowercase letters from the history; a history holding '!' ends (EOS) once it
    ends in three lowercase letters."""
    if ord("!") in history and len(history) >= 3 and all(ord("a") <= t <= ord("z") for t in history[-3:]):
        return EOS
    return ord("a") + (sum(history) * 7 + len(history)) % 26


def reference_completion(prompt_ids: list[int], max_tokens: int) -> tuple[str, str]:
    hist, out = list(prompt_ids), []
    for _ in range(max_tokens):
        t = next_token(hist)
        if t == EOS:
            return bytes(out).decode(), "stop"
        hist.append(t)
        out.append(t)
    return bytes(out).decode(), "length"


class FakeStepModel:
    model_id = "fake-tiny"
    eos_token_ids = frozenset({EOS})

    def __init__(self, context_length: int = 512, step_delay_s: float = 0.0):
        self.context_length = context_length
        self.weights_bytes = 1 << 20
        self.kv_bytes_per_token = 1024
        self.workspace_bytes = 1 << 20
        self.step_delay_s = step_delay_s  # simulated cost of one batched step, independent of batch size
        self.seqs: dict[str, list[int]] = {}
        self.batch_sizes: list[int] = []
        self.fail_next = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def _logits(self, hist: list[int]) -> np.ndarray:
        # peaked at the reference token, smooth around it so that sampling has somewhere to go
        logits = -np.abs(np.arange(VOCAB) - next_token(hist)).astype(np.float32) / 2
        logits[next_token(hist)] = 3.0
        return logits

    def prefill(self, seq_id, tokens, max_new_tokens):
        assert seq_id not in self.seqs
        self.seqs[seq_id] = list(tokens)
        return self._logits(self.seqs[seq_id])

    def step(self, seq_ids, tokens):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.batch_sizes.append(len(seq_ids))
        out = []
        for s, t in zip(seq_ids, tokens):
            self.seqs[s].append(t)
            out.append(self._logits(self.seqs[s]))
        return np.stack(out)

    def release(self, seq_id):
        del self.seqs[seq_id]


def make_state(model=None, *, kv_blocks_tokens: int | None = None, max_batch: int = 8, when_full: str = "wait",
               api_key: str = "", max_queue: int = 64, queue_timeout_s: float = 30.0, max_request_bytes: int = 1 << 20):
    model = model or FakeStepModel()
    pool_tokens = kv_blocks_tokens or 64 * model.context_length
    layout = plan_layout(budget_bytes=(8 << 20) + pool_tokens * model.kv_bytes_per_token, reserve_bytes=0,
                         weights_bytes=model.weights_bytes, workspace_bytes=model.workspace_bytes,
                         kv_bytes_per_token=model.kv_bytes_per_token, kv_block_tokens=16,
                         context_length=model.context_length, kv_pool_max_bytes=pool_tokens * model.kv_bytes_per_token)
    memory = MemoryManager(layout, context_length=model.context_length)
    metrics = Metrics()
    sched = Scheduler(model, memory, max_batch=max_batch, max_queue=max_queue, when_full=when_full,
                      queue_timeout_s=queue_timeout_s, retry_after_s=3, metrics=metrics)
    return ServerState(model=model, scheduler=sched, memory=memory, metrics=metrics, model_id=model.model_id,
                       api_key=api_key, max_request_bytes=max_request_bytes, power_mode=lambda: "MODE_30W")


class ServerThread:
    """uvicorn on 127.0.0.1:<ephemeral> in a thread, for in-process HTTP tests."""

    def __init__(self, state: ServerState):
        import uvicorn

        self.state = state
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.run(self.server.serve())

    def __enter__(self):
        self.state.scheduler.start()
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.state.scheduler.stop()
