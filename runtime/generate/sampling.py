"""Token selection from one row of logits: repetition penalty, temperature, top-k, top-p, seed.

The order follows the Hugging Face logits processors (penalty, temperature, top-k, top-p), so the
same settings pick from the same distribution as transformers' `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_sdk.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}", hint="0 means greedy")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}", hint="0 turns top-k off")
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}", hint="1 turns top-p off")
        if not (self.repetition_penalty > 0):
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}", hint="1 turns it off")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}", hint="omit it for a random one")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, previous: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty on tokens already seen: positive logits divided, negative multiplied."""
    if penalty == 1.0 or len(previous) == 0:
        return logits
    out = logits.copy()
    ids = np.unique(previous)
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    # a token stays when the mass before it is still below p
    before = np.cumsum(probs) - probs
    drop = order[before >= p]
    out = logits.copy()
    out[drop] = -np.inf
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - np.max(x))
    return z / z.sum()


@dataclass
class Sampler:
    """Picks the next token of one sequence; holds its own random generator for reproducible seeds."""

    params: SamplingParams
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.params.seed)

    def distribution(self, logits: np.ndarray, previous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) the next token is drawn from, after every filter.

        Works on the candidates only (top-k by partition, top-p by a growing partial sort), so a
        150k-token vocabulary costs a few milliseconds, not a full sort per token.
        """
        p = self.params
        x = apply_repetition_penalty(logits.astype(np.float64), previous, p.repetition_penalty) / p.temperature
        ids = np.arange(x.shape[-1])
        if 0 < p.top_k < x.shape[-1]:
            ids = np.flatnonzero(x >= np.partition(x, -p.top_k)[-p.top_k])  # ties at the k-th value stay
        probs = softmax(x[ids])
        if p.top_p < 1.0:
            keep = top_p_subset(probs, p.top_p)
            ids, probs = ids[keep], probs[keep] / probs[keep].sum()
        return ids, probs

    def probabilities(self, logits: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """The full [V] distribution (zeros outside the candidates)."""
        ids, probs = self.distribution(logits, previous)
        out = np.zeros(logits.shape[-1])
        out[ids] = probs
        return out

    def __call__(self, logits: np.ndarray, previous: np.ndarray) -> int:
        """logits: [V] float; previous: token ids of the sequence so far (prompt + generated)."""
        p = self.params
        if p.greedy:
            x = apply_repetition_penalty(logits, previous, p.repetition_penalty)
            return int(np.argmax(x))
        ids, probs = self.distribution(logits, previous)
        cdf = np.cumsum(probs)
        j = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(j, len(ids) - 1)])


def top_p_subset(probs: np.ndarray, p: float) -> np.ndarray:
    """Indices of the smallest most-likely set whose mass reaches p, most likely first (ties by index)."""
    n = len(probs)
    m = min(n, 256)
    while True:
        part = np.argpartition(-probs, m - 1)[:m] if m < n else np.arange(n)
        part = part[np.lexsort((part, -probs[part]))]
        cum = np.cumsum(probs[part])
        if cum[-1] >= p or m == n:
            break
        m = min(n, m * 4)
    return part[cum - probs[part] < p]
