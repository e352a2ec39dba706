"""Request queue and batched decode.

One scheduler thread owns the model. Each loop: drop cancelled requests, admit waiting requests in
arrival order (a request that does not fit blocks the ones behind it: first come, first served),
prefill the newly admitted ones, then decode one token for every running sequence in a single
batched `step`. While exactly one sequence runs and speculation is on for it, the step is speculative
instead: a proposer guesses k tokens, the model checks them in one `verify` forward and `keep`s the
accepted ones (batch 1 is bandwidth-bound: checking several tokens per weight read is what pays).
The KV cache always holds the sequence but its last token, so the two kinds of step alternate at any
step boundary. HTTP handlers talk to it through `submit` / `Request.cancel` and read events from
an asyncio queue fed thread-safely.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Sequence

from ...errors import ConfigError, EdgeSDKError, MemoryBudgetError
from ..generate.accept import TokenAccept
from ..generate.speculative import AdaptiveK, PromptLookup, SpeculativeConfig, verify_pick
from .engine import _NO_HISTORY, Sampler, SamplingParams, StepModel
from .memory import MemoryBusyError, MemoryManager, RequestTooLargeError
from .metrics import Metrics
from .requests import BadRequest

log = logging.getLogger(__name__)


class ServiceBusyError(MemoryBusyError):
    """The queue is full, the wait timed out, or the daemon is shutting down: retry later."""


@dataclass(frozen=True)
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    error: EdgeSDKError | None = None
    logprobs: list | None = None  # with logprobs: (token, log p, top) of the tokens behind this text


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop | None = None
    id: str = ""
    events: asyncio.Queue | None = None
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    completion_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    reserved: bool = False
    options: object | None = None  # structured.RequestOptions: grammar, logprobs, echo
    speculative: SpeculativeConfig | None = None  # what runs for it while it runs alone
    _cancelled: bool = False

    def cancel(self) -> None:
        """Called from any thread (client gone); the scheduler frees everything on its next loop."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def emit(self, event: Event) -> None:
        if self.loop is None:
            self.events.put_nowait(event)
        else:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the handler's loop is closed: nobody listens any more
                self._cancelled = True


class _Running:
    __slots__ = ("req", "sampler", "accept", "last", "proposer", "k")

    def __init__(self, req: Request, model: StepModel):
        self.req = req
        self.sampler: Sampler | None = None  # built in _prefill, under _guard: bad params fail only this request
        opts = req.options
        self.accept = TokenAccept(model.decode, max_tokens=req.params.max_tokens, stop=req.params.stop,
                                  eos=model.eos_token_ids, matcher=None if opts is None else opts.matcher)
        self.last = -1  # the last accepted token, not in the KV cache yet
        self.proposer = None  # speculation: PromptLookup or DraftModel, built at its first speculative step
        self.k = None if req.speculative is None else AdaptiveK(req.speculative)


class Scheduler:
    def __init__(self, model: StepModel, memory: MemoryManager, *, max_batch: int = 8, max_queue: int = 64,
                 when_full: str = "wait", queue_timeout_s: float = 30.0, retry_after_s: int = 2,
                 metrics: Metrics | None = None, speculative: SpeculativeConfig | None = None, speculative_k: int = 4):
        self.model = model
        self.speculative = speculative  # the server's setting; a request may override it
        self.speculative_k = speculative_k  # [speculative] k: where a request's speculation starts when the server runs none
        self.memory = memory
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.when_full = when_full
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.metrics = metrics or Metrics()
        self._waiting: deque[Request] = deque()
        self._running: dict[str, _Running] = {}
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._stop = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self.heartbeat = time.monotonic()

    # --- called from HTTP handlers -----------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None,
               options=None) -> Request:
        """Queue a request or raise: RequestTooLargeError (never fits) / MemoryBusyError (not now)."""
        req = Request(list(prompt_ids), params, loop, events=asyncio.Queue(), options=options,
                      speculative=self.speculation_for(params.speculative))
        self.memory.check(len(req.prompt_ids), params.max_tokens)
        with self._cv:
            req.id = f"req-{next(self._ids)}"
            if self.failure:
                raise ServiceBusyError(f"the scheduler stopped ({self.failure}) and serves nothing more",
                                       hint="restart the service", retry_after_s=self.retry_after_s)
            if self._draining or self._stop:
                raise ServiceBusyError("the daemon is shutting down and admits no new requests", hint="retry against the restarted service",
                                       retry_after_s=self.retry_after_s)
            if len(self._waiting) >= self.max_queue:
                raise ServiceBusyError(f"{len(self._waiting)} requests are already waiting (scheduler.max_queue)",
                                       hint="retry later", retry_after_s=self.retry_after_s)
            if self.when_full == "reject":
                self._reserve(req)
            self._waiting.append(req)
            self.metrics.queue_depth = len(self._waiting)
            self._cv.notify()
        return req

    def speculation_for(self, asked) -> SpeculativeConfig | None:
        """What runs for a request's `speculative` (None: the server's; False: off; requests.SpecRequest)."""
        if asked is None or asked is False:
            return self.speculative if asked is None else None
        if not getattr(self.model, "can_speculate", False):
            raise BadRequest("this daemon's backend cannot roll back its KV cache, so it cannot speculate; "
                             "leave 'speculative' out", "speculative")
        base = self.speculative or SpeculativeConfig(prompt_lookup=True, k=self.speculative_k, k_max=max(8, self.speculative_k))
        lookup = base.prompt_lookup if asked.method == "server" else asked.method == "prompt_lookup"
        if not lookup and not getattr(self.model, "has_draft", False):
            raise BadRequest("'speculative' asks for a draft model and this daemon has none: start it with --draft BUNDLE "
                             "([speculative] draft), or send {\"type\": \"prompt_lookup\"}", "speculative")
        k = asked.k or base.k
        return replace(base, prompt_lookup=lookup, k=k, k_max=max(base.k_max, k), ngram=asked.ngram or base.ngram)

    def _reserve(self, req: Request) -> None:
        try:
            self.memory.reserve(req.id, len(req.prompt_ids), req.params.max_tokens)
        except MemoryBusyError as exc:
            raise MemoryBusyError(exc.message, hint=exc.hint, retry_after_s=self.retry_after_s) from None
        req.reserved = True

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edge-sdk-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel everything and end the thread."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def begin_drain(self) -> None:
        with self._cv:
            self._draining = True

    def drain(self, timeout_s: float) -> bool:
        """Stop admitting; wait up to timeout_s for in-flight requests; cancel the rest (finish "abort").
        Returns True when everything finished on its own."""
        self.begin_drain()
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._waiting or self._running) and time.monotonic() < deadline:
                self._cv.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            clean = not (self._waiting or self._running)
            for r in list(self._waiting) + [run.req for run in self._running.values()]:
                r.cancel()
            self._cv.notify()
            while (self._waiting or self._running) and self._thread is not None and self._thread.is_alive():
                self._cv.wait(timeout=0.1)
        return clean

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def failure(self) -> str | None:
        """Why the scheduler thread ended on its own; None while it runs, before start() and after stop()."""
        if self._failure is None and self._thread is not None and not self._thread.is_alive() and not self._stop:
            return "the scheduler thread ended"
        return self._failure

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._running)

    # --- the loop (scheduler thread) -----------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug, not a request: say so everywhere instead of hanging
            log.critical("the scheduler stopped: %s", exc, exc_info=True)
            self._failure = f"{type(exc).__name__}: {exc}"
            try:
                self._fail_everything(EdgeSDKError(f"the scheduler stopped: {self._failure}", hint="restart the service"))
            except Exception:
                log.exception("failing the requests in flight failed")

    def _fail_everything(self, err: EdgeSDKError) -> None:
        with self._cv:
            for req in list(self._waiting):
                self._waiting.remove(req)
                self.memory.release(req.id)
                req.finish_reason = "error"
                req.emit(Event("error", error=err))
            for run in list(self._running.values()):
                self._finish(run, None, error=err)
            self._cv.notify_all()

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._waiting or self._running):
                    self.heartbeat = time.monotonic()
                    self._cv.wait(timeout=1.0)
                if self._stop:
                    break
                self.heartbeat = time.monotonic()
                self._drop_cancelled()
                admitted = self._admit()
                self.metrics.queue_depth = len(self._waiting)
            for req in admitted:
                run = _Running(req, self.model)
                self._running[req.id] = run
                self._guard([run], self._prefill, run)
            self._guard(list(self._running.values()), self._decode_step)
            with self._cv:
                self._cv.notify_all()
        with self._cv:
            for req in list(self._waiting):
                self._abort_waiting(req)
            for run in list(self._running.values()):
                self._finish(run, "abort")
            self._cv.notify_all()

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for req in list(self._waiting):
            if req.cancelled:
                self._abort_waiting(req)
            elif not req.reserved and now - req.created > self.queue_timeout_s:
                self._waiting.remove(req)
                req.emit(Event("error", error=ServiceBusyError(
                    f"waited {self.queue_timeout_s:.0f} s for memory or a batch slot", hint="retry later",
                    retry_after_s=self.retry_after_s)))
        for run in list(self._running.values()):
            if run.req.cancelled:
                self._finish(run, "abort")

    def _abort_waiting(self, req: Request) -> None:
        self._waiting.remove(req)
        if req.reserved:
            self.memory.release(req.id)
        req.finish_reason = "abort"
        req.emit(Event("done", finish_reason="abort"))

    def _admit(self) -> list[Request]:
        admitted = []
        while self._waiting and len(self._running) + len(admitted) < self.max_batch:
            req = self._waiting[0]
            try:
                # what the model will hold once this request joins the batch (padding to the longest row included)
                held = self._kv_held([(len(r.prompt_ids), r.params.max_tokens) for r in admitted + [req]])
                if not req.reserved:
                    self.memory.reserve(req.id, len(req.prompt_ids), req.params.max_tokens, held_bytes=held)
                    req.reserved = True
                elif held is not None:
                    self.memory.hold(held)
            except MemoryBudgetError as exc:
                if self._running or admitted:
                    break  # first come, first served: the ones behind it wait too
                self._waiting.popleft()  # alone, with nothing else to wait for: it can never fit
                self._refuse(req, exc)
                continue
            admitted.append(self._waiting.popleft())
        return admitted

    def _refuse(self, req: Request, exc: MemoryBudgetError) -> None:
        if req.reserved:
            self.memory.release(req.id)
        req.finish_reason = "error"
        req.emit(Event("error", error=RequestTooLargeError(
            f"{exc.message}, with nothing else running", hint="lower max_tokens or the prompt, or raise the memory budget")))

    def _kv_held(self, joining: list[tuple[int, int]] | None = None) -> int | None:
        """KV bytes the model holds at their peak until the next step ends (None: the model does not say)."""
        held = getattr(self.model, "kv_bytes_held", None)
        if held is None:
            return None
        try:
            return int(held(joining or ()))
        except MemoryBudgetError:  # the batch cannot take these rows now
            raise
        except Exception:  # accounting must never take a request down; the next step settles it
            log.exception("the model could not report its KV memory")
            return None

    def _guard(self, runs: list[_Running], fn, *args) -> None:
        """Run a model call; if it fails, fail the requests it served (the daemon keeps going)."""
        try:
            fn(*args)
        except Exception as exc:
            log.exception("model call failed")
            err = exc if isinstance(exc, EdgeSDKError) else EdgeSDKError(f"the model failed: {exc}")
            for run in runs:
                if run.req.id in self._running:
                    self._finish(run, None, error=err)

    def _prefill(self, run: _Running) -> None:
        req = run.req
        run.sampler = Sampler(req.params)
        opts = req.options
        if opts is not None and opts.echo and opts.logprobs is not None:
            opts.prefill_logprobs(self.model, req.prompt_ids)
        if req.params.max_tokens == 0:  # echo: the prompt alone
            return self._finish(run, "length")
        logits = self.model.prefill(req.id, req.prompt_ids, req.params.max_tokens)
        self.metrics.prompt_tokens += len(req.prompt_ids)
        self._next(run, logits)

    def _decode_step(self) -> None:
        runs = [r for r in self._running.values() if r.req.finish_reason is None]
        if not runs:
            return
        if len(runs) == 1 and runs[0].k is not None:
            return self._speculative_step(runs[0])
        for run in runs:
            run.proposer = None  # batched now: a draft's KV cache goes (the budget holds one)
        t0 = time.monotonic()
        logits = self.model.step([r.req.id for r in runs], [r.last for r in runs])
        self.metrics.record_step(len(runs), time.monotonic() - t0)
        held = self._kv_held()
        if held is not None:
            self.memory.settle(held)  # the rebuild is done: the old batch and prefill caches are gone
        for run, row in zip(runs, logits):
            self._next(run, row)

    def _speculative_step(self, run: _Running) -> None:
        """Propose k tokens, check [last, *drafts] in one forward, accept the target's own choices
        (runtime/generate/speculative.py), keep the accepted tokens in the KV cache."""
        req = run.req
        spec = req.speculative
        t0 = time.monotonic()
        history = req.prompt_ids + req.completion_ids
        if run.proposer is None:
            run.proposer = PromptLookup(spec) if spec.prompt_lookup else \
                self.model.draft_proposer(run.sampler.runtime.params, len(req.prompt_ids) + req.params.max_tokens)
        run.proposer.commit(history)
        k = min(run.k.k, req.params.max_tokens - run.accept.accepted - 1)
        drafts, qs = run.proposer.propose(history, k) if k > 0 else ([], [])
        rows = self.model.verify(req.id, [run.last, *drafts])
        taken = accepted = 0  # tokens this step produced; of them, draft tokens the target kept
        for i, row in enumerate(rows):
            draft, q = (drafts[i], qs[i]) if i < len(drafts) else (None, None)
            token = self._next(run, row, verify_pick(run.sampler.runtime, _NO_HISTORY, draft, q))
            taken += 1
            if token is None or token != draft:
                break
            accepted += 1  # counted before the end check: a request may end on an accepted draft token
            if req.id not in self._running:
                break
        run.k.update(len(drafts), accepted)
        m = self.metrics
        m.spec_steps, m.spec_proposed, m.spec_accepted = m.spec_steps + 1, m.spec_proposed + len(drafts), m.spec_accepted + accepted
        if req.id in self._running:
            self.model.keep(req.id, taken)
        m.record_step(1, time.monotonic() - t0, tokens=taken)
        held = self._kv_held()
        if held is not None:
            self.memory.settle(held)

    def _next(self, run: _Running, logits, sample=None) -> int | None:
        """Pick and accept one token (runtime/generate/accept.py, as the generation loop does); the token,
        or None when the grammar allows none."""
        req, acc = run.req, run.accept
        token = acc.pick(logits, sample or run.sampler)
        if token is None:
            self._finish(run, acc.finish_reason)
            return None
        if req.options is not None and token not in acc.eos:
            req.options.record(logits, token)
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
            self.metrics.ttft.observe(req.first_token_at - req.created)
        self.metrics.generation_tokens += 1
        text = acc.accept(token)
        if token not in acc.eos:
            req.completion_ids.append(token)
            run.last = token
        if acc.finish_reason:
            self._finish(run, acc.finish_reason, text=text)
        elif text:
            req.emit(Event("text", text=text, logprobs=_take(req)))
        return token

    def _finish(self, run: _Running, reason: str | None, error: EdgeSDKError | None = None, text: str = "") -> None:
        req = run.req
        self._running.pop(req.id, None)
        try:
            self.model.release(req.id)
        except Exception:  # e.g. a sequence whose prefill failed; its memory is released all the same
            log.exception("releasing %s failed", req.id)
        finally:
            self.memory.release(req.id, held_bytes=self._kv_held())  # its row may stay in the batch until a rebuild
        req.finish_reason = reason or "error"
        self.metrics.finished[req.finish_reason] = self.metrics.finished.get(req.finish_reason, 0) + 1
        if error is not None:
            req.emit(Event("error", error=error))
            return
        rest = text + run.accept.end(reason)
        if rest:
            req.emit(Event("text", text=rest, logprobs=_take(req)))
        req.emit(Event("done", finish_reason=reason, logprobs=_take(req)))


def server_speculation(section, model) -> SpeculativeConfig | None:
    """The daemon's [speculative] settings (config.SpeculativeSection) -> the scheduler's default, or None (off)."""
    if not (section.draft or section.prompt_lookup):
        return None
    if not getattr(model, "can_speculate", False):
        raise ConfigError("speculation needs a backend that can roll back its KV cache, and this one cannot",
                          hint="serve on onnxruntime's CPU provider, or drop --draft / --prompt-lookup")
    if section.draft and not getattr(model, "has_draft", False):
        raise ConfigError(f"the served model has no draft loaded from {section.draft}", hint="load the bundle with its draft")
    return SpeculativeConfig(k=section.k, k_max=max(8, section.k), prompt_lookup=section.prompt_lookup)


def _take(req: Request) -> list | None:
    return None if req.options is None else req.options.take()
