"""Prefill + decode loop over a Backend: sampling, EOS, stop strings, max tokens, streaming."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from edge_sdk.errors import ConfigError, MemoryBudgetError

from ..backends.base import Backend
from .accept import TokenAccept
from .constrain import GrammarCompiler
from .logprobs import TOP_LOGPROBS_MAX, token_logprobs
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None  # None = the tokenizer's
    ignore_eos: bool = False
    constraint: object | None = None  # constrain.Constraint: JSON, JSON schema, regex or Lark grammar
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (0..20)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        self.sampling(0)  # validates the sampling fields once, here
        if self.logprobs is not None and not 0 <= self.logprobs <= TOP_LOGPROBS_MAX:
            raise ConfigError(f"logprobs must be in [0, {TOP_LOGPROBS_MAX}], got {self.logprobs}", hint="None turns them off")

    def sampling(self, row: int) -> SamplingParams:
        # each row of a batch draws from its own stream: seed, seed+1, ...
        seed = None if self.seed is None else self.seed + row
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty, seed)


@dataclass
class Chunk:
    """One streamed piece of one sequence. `text` may be empty while a character or stop string is incomplete."""

    index: int  # row of the batch
    token_id: int | None
    text: str
    finish_reason: str | None = None  # "stop" (EOS, stop string, grammar complete) | "length" | "grammar_dead_end"
    logprob: float | None = None  # with GenerationConfig.logprobs: log p(token_id)
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log p), most likely first


@dataclass
class Timings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    first_token_s: float = 0.0  # time to first token (prefill + first sampling)
    decode_s: float = 0.0  # forward passes after the first token
    decode_steps: int = 0
    decode_tokens: int | None = None  # speculative decoding: tokens after the first (a step yields several)
    spec_proposed: int = 0  # draft tokens checked by the target
    spec_accepted: int = 0  # of which accepted

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.decode_steps if self.decode_tokens is None else self.decode_tokens
        return n / self.decode_s if self.decode_s else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else None


@dataclass
class _Row:
    sampler: Sampler
    history: list[int]
    accept: TokenAccept
    generated: list[int] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        return self.accept.finish_reason


class Generator:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, *, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 kv_budget_bytes: int | None = None):
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.backend, self.tokenizer, self.prefill_chunk = backend, tokenizer, prefill_chunk
        self.max_seq_len = max_seq_len or backend.io.max_positions
        self.kv_budget_bytes = kv_budget_bytes
        self.timings = Timings()
        self.draft = None  # a draft model's Backend for speculative decoding (Model.attach_draft)

    def stream(self, prompts: list[list[int]], cfg: GenerationConfig, speculative=None) -> Iterator[Chunk]:
        """Generate for a batch of tokenized prompts; yields chunks in step order, row by row.
        `speculative`: a speculative.SpeculativeConfig (one prompt at a time)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt must have at least one token", hint="pass non-empty text")
        batch, longest = len(prompts), max(len(p) for p in prompts)
        capacity = longest + cfg.max_new_tokens
        if capacity > self.max_seq_len:
            raise MemoryBudgetError(f"prompt ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
                                    f"context of {self.max_seq_len} tokens", hint="shorten the prompt or lower max_new_tokens")
        self.check_kv_budget(batch, capacity)
        eos = set(self.tokenizer.eos_token_ids if cfg.eos_token_ids is None else cfg.eos_token_ids)
        if cfg.ignore_eos:
            eos = set()
        if speculative is not None:
            yield from self._speculate(prompts, cfg, speculative, eos, capacity)
            return
        pad = self.tokenizer.pad_token_id
        ids = np.full((batch, longest), pad, np.int64)
        mask = np.zeros((batch, longest), np.int64)
        for r, p in enumerate(prompts):
            ids[r, longest - len(p):] = p  # left padding
            mask[r, longest - len(p):] = 1
        matchers = self.matchers(len(prompts), cfg)
        rows = [_Row(Sampler(cfg.sampling(r)), list(p), TokenAccept(self.tokenizer, max_tokens=cfg.max_new_tokens, stop=cfg.stop,
                                                                   eos=eos, matcher=m))
                for r, (p, m) in enumerate(zip(prompts, matchers))]
        t = self.timings = Timings(prompt_tokens=int(mask.sum()))
        cache = self.backend.new_cache(batch, capacity)
        start = time.perf_counter()
        logits = self.prefill(ids, mask, cache)
        t.prefill_s = time.perf_counter() - start
        for step in range(cfg.max_new_tokens):
            feed = np.full((batch, 1), pad, np.int64)
            for r, row in enumerate(rows):
                if row.finish_reason:
                    continue
                tok = row.accept.pick(logits[r], lambda x: row.sampler(x, np.asarray(row.history, np.int64)))
                if tok is None:  # the grammar dead-ends: no token
                    yield Chunk(r, None, row.accept.end(), row.finish_reason)
                    continue
                feed[r, 0] = tok
                row.history.append(tok)
                row.generated.append(tok)
                c = Chunk(r, tok, row.accept.accept(tok), row.finish_reason)
                if cfg.logprobs is not None:
                    c.logprob, c.top_logprobs = token_logprobs(logits[r], tok, cfg.logprobs)
                yield c
            if step == 0:
                t.first_token_s = time.perf_counter() - start
            t.generated_tokens += sum(1 for row in rows if row.generated and len(row.generated) == step + 1)
            if all(row.finish_reason for row in rows):
                break
            s = time.perf_counter()
            logits = self.backend.forward(feed, cache)[:, -1, :]
            t.decode_s += time.perf_counter() - s
            t.decode_steps += 1

    def _speculate(self, prompts, cfg, spec, eos, capacity) -> Iterator[Chunk]:
        from . import speculative

        if len(prompts) != 1:
            raise ConfigError(f"speculative decoding runs one prompt at a time, got {len(prompts)}",
                              hint="generate the prompts one by one, or turn speculation off for a batch")
        if not spec.prompt_lookup and self.draft is not None and self.kv_budget_bytes is not None:
            need = self.kv_bytes(1, capacity) + getattr(self.draft, "kv_copies", 2) * self.draft.io.kv_bytes_per_token() * capacity
            if need > self.kv_budget_bytes:
                raise MemoryBudgetError(f"the target's and the draft's KV caches for {capacity} tokens need {need / 2**20:.1f} MiB; "
                                        f"the memory plan leaves {self.kv_budget_bytes / 2**20:.1f} MiB", hint="lower max_new_tokens")
        yield from speculative.stream(self, prompts[0], cfg, spec, eos, capacity, self.draft)

    def matchers(self, batch: int, cfg: GenerationConfig) -> list:
        """One constrain.Matcher per row (None without a constraint)."""
        if cfg.constraint is None:
            return [None] * batch
        if getattr(self, "_grammars", None) is None:
            self._grammars = GrammarCompiler.for_tokenizer(self.tokenizer, self.backend.io.vocab_size)
        return [self._grammars.matcher(cfg.constraint) for _ in range(batch)]

    def kv_bytes(self, batch: int, capacity: int) -> int:
        """What a cache for `batch` x `capacity` tokens allocates (two buffers per layer and kind where
        past and present swap, one where the graph appends in place)."""
        return getattr(self.backend, "kv_copies", 2) * self.backend.io.kv_bytes_per_token() * capacity * batch

    def check_kv_budget(self, batch: int, capacity: int) -> None:
        need = self.kv_bytes(batch, capacity)
        if self.kv_budget_bytes is not None and need > self.kv_budget_bytes:
            raise MemoryBudgetError(f"a KV cache for {batch} x {capacity} tokens needs {need / 2**20:.1f} MiB; "
                                    f"the memory plan leaves {self.kv_budget_bytes / 2**20:.1f} MiB for it",
                                    hint="lower max_new_tokens or the batch, or shorten the prompt")

    def prefill(self, ids: np.ndarray, mask: np.ndarray, cache) -> np.ndarray:
        """Run the prompt in chunks (bounds the [B, chunk, V] logits and activations); last logits [B, V]."""
        for start in range(0, ids.shape[1], self.prefill_chunk):
            end = start + self.prefill_chunk
            logits = self.backend.forward(ids[:, start:end], cache, mask[:, start:end])
        return logits[:, -1, :]
