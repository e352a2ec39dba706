"""Speculative decoding: a proposer guesses k tokens, the target checks them in one multi-token
forward pass, and its KV cache rolls back to what was accepted.

Lossless: greedy keeps a draft token only when it is the target's own argmax; sampling accepts a
draft token d with probability min(1, p(d) / q(d)) and otherwise draws from norm(max(0, p - q)),
so every token is distributed as the target's (q is a point mass for prompt lookup).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edge_sdk.errors import ConfigError

from ..backends.base import can_rollback
from .sampling import Sampler, SamplingParams

K_MAX = 16
ROLLBACK_REFUSED = "speculation needs a backend that can roll back its cache"


@dataclass(frozen=True)
class SpeculativeConfig:
    """k: draft tokens per step (adapts between 1 and k_max when `adaptive`); prompt_lookup: propose
    the tokens that followed the latest earlier occurrence of the last n-gram (ngram down to
    ngram_min tokens) instead of running a draft model."""

    k: int = 4
    adaptive: bool = True
    k_max: int = 8
    prompt_lookup: bool = False
    ngram: int = 3
    ngram_min: int = 1

    def __post_init__(self):
        for name in ("k", "k_max", "ngram", "ngram_min"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"speculative {name} must be a positive integer, got {v!r}", hint="k=4 is a good start")
        if self.k > K_MAX or self.k_max > K_MAX:
            raise ConfigError(f"speculative k and k_max must be at most {K_MAX}, got {self.k} / {self.k_max}",
                              hint="longer guesses are almost never all accepted")
        if self.ngram_min > self.ngram:
            raise ConfigError(f"ngram_min ({self.ngram_min}) exceeds ngram ({self.ngram})")

    @classmethod
    def of(cls, value, *, has_draft: bool) -> "SpeculativeConfig | None":
        """None / False / True / "prompt-lookup" / "draft" / dict / SpeculativeConfig -> config or None (off)."""
        if value is None:
            return cls() if has_draft else None
        if value is False:
            return None
        if value is True or value == "draft":
            if not has_draft:
                raise ConfigError("speculative decoding with a draft model needs one loaded",
                                  hint="edge_sdk.load(target, draft=DRAFT_BUNDLE), or speculative='prompt-lookup'")
            return cls()
        if value in ("prompt-lookup", "prompt_lookup"):
            return cls(prompt_lookup=True)
        if isinstance(value, dict):
            try:
                cfg = cls(**value)
            except TypeError as exc:
                raise ConfigError(f"bad speculative settings {value!r}: {exc}",
                                  hint="keys: k, adaptive, k_max, prompt_lookup, ngram, ngram_min") from None
            value = cfg
        if isinstance(value, cls):
            if not value.prompt_lookup and not has_draft:
                raise ConfigError("speculative decoding with a draft model needs one loaded",
                                  hint="edge_sdk.load(target, draft=DRAFT_BUNDLE), or prompt_lookup=True")
            return value
        raise ConfigError(f"speculative must be True, False, 'prompt-lookup', a dict or a SpeculativeConfig, got {value!r}")


class AdaptiveK:
    """k grows by one after a step that accepted every draft token and shrinks by one otherwise."""

    def __init__(self, cfg: SpeculativeConfig):
        self.k, self.cfg = min(cfg.k, cfg.k_max), cfg

    def update(self, proposed: int, accepted: int) -> None:
        if not self.cfg.adaptive or proposed == 0:
            return
        self.k = min(self.k + 1, self.cfg.k_max) if accepted == proposed else max(1, self.k - 1)


class PromptLookup:
    """Draft tokens copied from the sequence itself: after the latest earlier occurrence of its last
    n tokens (n = ngram .. ngram_min), the tokens that followed. q is a point mass (None).

    An index {n-gram: latest start} grows with the sequence (a few dict updates per token), so a
    proposal costs O(ngram) whatever the length; a sequence that is not an extension of the last one
    rebuilds it."""

    def __init__(self, cfg: SpeculativeConfig):
        self.cfg = cfg
        self._index: dict[tuple, int] = {}  # n-gram -> latest start s with s + n <= len(history) - 1
        self._seq: list[int] = []

    def _extend(self, history: list[int]) -> None:
        n0 = len(self._seq)
        if history[:n0] != self._seq:
            self._index, self._seq, n0 = {}, [], 0
        self._seq.extend(history[n0:])
        seq, end = self._seq, len(self._seq) - 1  # windows end before the last token
        for stop in range(max(n0 - 1, 0), end):  # windows ending at stop (exclusive: stop + 1), new ones only
            for n in range(self.cfg.ngram_min, self.cfg.ngram + 1):
                if stop + 1 - n >= 0:
                    self._index[tuple(seq[stop + 1 - n:stop + 1])] = stop + 1 - n

    def propose(self, history: list[int], k: int) -> tuple[list[int], list]:
        self._extend(history)
        for n in range(min(self.cfg.ngram, len(history) - 1), self.cfg.ngram_min - 1, -1):
            start = self._index.get(tuple(history[-n:]))
            if start is not None:
                out = list(history[start + n:start + n + k])
                return out, [None] * len(out)
        return [], []

    def commit(self, history: list[int]) -> None:
        pass


class DraftModel:
    """A smaller model with its own KV cache, run ahead by k tokens; rolled back to the accepted prefix."""

    def __init__(self, backend, sampling: SamplingParams, capacity: int, vocab_size: int):
        if not can_rollback(backend):
            raise ConfigError(f"the draft model's backend ({backend.provider}): {ROLLBACK_REFUSED}",
                              hint="run the draft on onnxruntime's CPU provider")
        self.backend, self.vocab = backend, vocab_size
        self.sampler = Sampler(SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p,
                                              sampling.repetition_penalty, None if sampling.seed is None else sampling.seed + 7919))
        self.cache = backend.new_cache(1, capacity)
        self.tokens: list[int] = []  # what the draft's cache holds

    def propose(self, history: list[int], k: int) -> tuple[list[int], list]:
        feed = history[len(self.tokens):]
        drafts, qs, seq = [], [], list(history)
        for i in range(k):
            for at in range(0, len(feed), 512):  # a long prompt in chunks, as the target's prefill
                logits = self.backend.forward(np.asarray([feed[at:at + 512]], np.int64), self.cache)[0, -1]
            self.tokens += feed
            prev = np.asarray(seq, np.int64)
            if self.sampler.params.greedy:
                tok, q = self.sampler(logits, prev), None
            else:
                q = self._fit(self.sampler.probabilities(logits, prev))
                tok = int(self.sampler.rng.choice(len(q), p=q))
            drafts.append(tok)
            qs.append(q)
            seq.append(tok)
            feed = [tok]
        return drafts, qs

    def _fit(self, q: np.ndarray) -> np.ndarray:
        """The draft's distribution over the target's vocabulary (sizes may differ by padding rows)."""
        if len(q) > self.vocab:
            q = q[: self.vocab]
        elif len(q) < self.vocab:
            q = np.concatenate([q, np.zeros(self.vocab - len(q))])
        return q / q.sum()

    def commit(self, history: list[int]) -> None:
        n = 0
        limit = min(len(self.tokens), len(history))
        while n < limit and self.tokens[n] == history[n]:
            n += 1
        self.cache.rollback(n)
        self.tokens = self.tokens[:n]


def verify_pick(sampler: Sampler, previous: np.ndarray, draft: int | None, q: np.ndarray | None):
    """A `sample(logits)` for TokenAccept.pick at one position: the target's choice given a draft token.

    Greedy: the target's argmax (the draft is kept when it equals it). Sampling: keep `draft` with
    probability min(1, p/q), else draw from norm(max(0, p - q)); without a draft, draw from p."""

    def pick(logits: np.ndarray) -> int:
        if draft is None or sampler.params.greedy:
            return sampler(logits, previous)
        p = sampler.probabilities(logits, previous)
        qd = 1.0 if q is None else float(q[draft])
        if qd > 0 and sampler.rng.random() * qd < p[draft]:
            return draft
        residual = p.copy()
        if q is None:
            residual[draft] = 0.0
        else:
            residual = np.maximum(p - q[: len(p)], 0.0)
        total = residual.sum()
        if total <= 0:  # p == q up to rounding: the draft was accepted in law; draw from p
            residual, total = p, p.sum()
        return int(sampler.rng.choice(len(residual), p=residual / total))

    return pick


def check_draft(target, draft) -> None:
    """Refuse a draft whose tokenizer differs from the target's in content, or which is larger."""
    a, b = target.tokenizer.vocab(), draft.tokenizer.vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:1]
        where = f" (first difference: {diff[0][0]!r} -> {diff[0][1]})" if diff else ""
        raise ConfigError(f"the draft's tokenizer differs from the target's: {len(b)} vs {len(a)} tokens{where}",
                          hint="use a draft from the same model family (same tokenizer.json), or prompt lookup")
    if target.tokenizer.eos_token_ids != draft.tokenizer.eos_token_ids:
        raise ConfigError(f"the draft's end tokens {draft.tokenizer.eos_token_ids} differ from the target's "
                          f"{target.tokenizer.eos_token_ids}", hint="use a draft from the same model family")
    tw, dw = weight_bytes(target), weight_bytes(draft)
    if dw >= tw:
        raise ConfigError(f"the draft ({dw / 2**20:.1f} MiB of weights) is not smaller than the target ({tw / 2**20:.1f} MiB)",
                          hint="a draft must be a smaller model than the one it speeds up")


def weight_bytes(model) -> int:
    """Bytes of the bundle's weight files (what a decode step reads)."""
    files = model.manifest.get("files") or {}
    sizes = {k: int(v.get("size", 0)) for k, v in files.items()} if isinstance(files, dict) else {}
    weights = [n for k, n in sizes.items() if k.endswith(".weights")]
    return sum(weights) if weights else sum(n for k, n in sizes.items() if not k.startswith("tokenizer"))


def stream(gen, prompt: list[int], cfg, spec: SpeculativeConfig, eos: set, capacity: int, draft_backend=None):
    """Generator.stream for one prompt with speculation: yields the same Chunks, every token through
    TokenAccept (grammar mask, EOS, stop strings, token limit)."""
    from .accept import TokenAccept
    from .generation import Chunk, Timings
    from .logprobs import token_logprobs

    if not can_rollback(gen.backend):
        raise ConfigError(f"{ROLLBACK_REFUSED} (this one runs on {gen.backend.provider})",
                          hint="run on onnxruntime's CPU provider, or turn speculation off")
    sampler = Sampler(cfg.sampling(0))
    accept = TokenAccept(gen.tokenizer, max_tokens=cfg.max_new_tokens, stop=cfg.stop, eos=eos, matcher=gen.matchers(1, cfg)[0])
    if spec.prompt_lookup:
        proposer = PromptLookup(spec)
    else:
        if draft_backend is None:
            raise ConfigError("speculative decoding with a draft model needs one loaded", hint="edge_sdk.load(target, draft=...)")
        proposer = DraftModel(draft_backend, cfg.sampling(0), capacity, gen.backend.io.vocab_size)
    ks = AdaptiveK(spec)
    t = gen.timings = Timings(prompt_tokens=len(prompt), decode_tokens=0)
    cache = gen.backend.new_cache(1, capacity)
    start = time.perf_counter()
    rows = gen.prefill(np.asarray([prompt], np.int64), np.ones((1, len(prompt)), np.int64), cache)
    t.prefill_s = time.perf_counter() - start
    history, drafts, qs = list(prompt), [], []
    while True:
        kept = 0  # rows[i] is the target's next-token logits after history + drafts[:i]
        for i, row in enumerate(rows):
            d, q = (drafts[i], qs[i]) if i < len(drafts) else (None, None)
            tok = accept.pick(row, verify_pick(sampler, np.asarray(history, np.int64), d, q))
            if tok is None:  # the grammar dead-ends
                yield Chunk(0, None, accept.end(), accept.finish_reason)
                return
            history.append(tok)
            c = Chunk(0, tok, accept.accept(tok), accept.finish_reason)
            if cfg.logprobs is not None:
                c.logprob, c.top_logprobs = token_logprobs(row, tok, cfg.logprobs)
            t.generated_tokens += 1
            if t.generated_tokens == 1:
                t.first_token_s = time.perf_counter() - start
            else:
                t.decode_tokens += 1
            yield c
            if tok != d:
                break
            kept += 1
            t.spec_accepted += 1
            if accept.finish_reason:
                return
        if accept.finish_reason:
            return
        ks.update(len(drafts), kept)
        s = time.perf_counter()
        cache.rollback(len(history) - 1)  # batch 1, no padding: positions are tokens; the last one is fed next
        proposer.commit(history)
        k = min(ks.k, cfg.max_new_tokens - accept.accepted - 1)
        drafts, qs = proposer.propose(history, k) if k > 0 else ([], [])
        t.spec_proposed += len(drafts)
        rows = gen.backend.forward(np.asarray([[history[-1], *drafts]], np.int64), cache)[0]
        t.decode_s += time.perf_counter() - s
        t.decode_steps += 1
