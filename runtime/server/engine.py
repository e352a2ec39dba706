"""What the scheduler needs from a model, and token sampling.

The scheduler drives a model one step at a time: `prefill` one new sequence, then `step` every
running sequence together (one batched decode call), then `release` finished ones. A model backend
(edge_sdk.load) is adapted to this protocol in `adapter.py`; tests may pass any object with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from ..generate.sampling import Sampler as RuntimeSampler
from ..generate.sampling import SamplingParams as RuntimeSamplingParams

_NO_HISTORY = np.empty(0, dtype=np.int64)  # no repetition penalty over the OpenAI API


class StepModel(Protocol):
    model_id: str
    context_length: int  # tokens per sequence, prompt + generated
    eos_token_ids: frozenset[int]
    weights_bytes: int  # resident weights (memory accounting)
    kv_bytes_per_token: int  # all layers, K and V
    workspace_bytes: int  # activations at max batch (memory accounting)

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict]) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def prefill(self, seq_id: str, tokens: Sequence[int], max_new_tokens: int) -> np.ndarray:
        """Run the prompt, keep its KV under seq_id (room for max_new_tokens more); logits of the last position: [vocab]."""

    def step(self, seq_ids: Sequence[str], tokens: Sequence[int]) -> np.ndarray:
        """Append one token to each sequence; logits: [len(seq_ids), vocab]."""

    def release(self, seq_id: str) -> None: ...

    # optional: kv_bytes_held(joining=()) -> int, the KV bytes held at their peak until the next step ends
    # when `joining` ((prompt tokens, max new tokens) pairs) join; the memory manager counts it (adapter.py)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    speculative: object = None  # None: the server's setting; False: off; a SpeculativeConfig (requests.py)


class Sampler:
    """Per-request sampler over the runtime's candidate-only sampler: greedy at temperature 0, else
    temperature + nucleus (top_p) sampling with the request's seed."""

    def __init__(self, params: SamplingParams):
        self.params = params
        greedy = params.temperature <= 1e-5
        self._sampler = RuntimeSampler(RuntimeSamplingParams(
            temperature=0.0 if greedy else params.temperature, top_p=params.top_p, seed=params.seed))

    def __call__(self, logits: np.ndarray) -> int:
        return self._sampler(np.asarray(logits), _NO_HISTORY)

    @property
    def runtime(self) -> RuntimeSampler:
        """The runtime's sampler (speculative verification draws from it)."""
        return self._sampler
