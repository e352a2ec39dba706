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

    def probabilities(self, logits: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """The distribution the next token is drawn from (after every filter)."""
        p = self.params
        x = apply_repetition_penalty(logits.astype(np.float64), previous, p.repetition_penalty)
        x = x / p.temperature
        x = filter_top_k(x, p.top_k)
        x = filter_top_p(x, p.top_p)
        return softmax(x)

    def __call__(self, logits: np.ndarray, previous: np.ndarray) -> int:
        """logits: [V] float; previous: token ids of the sequence so far (prompt + generated)."""
        p = self.params
        if p.greedy:
            x = apply_repetition_penalty(logits, previous, p.repetition_penalty)
            return int(np.argmax(x))
        probs = self.probabilities(logits, previous)
        return int(self.rng.choice(probs.shape[-1], p=probs))
