"""One sequence's token-accept step, shared by the generation loop and the daemon's scheduler: the
grammar mask before sampling, then per accepted token EOS, stop strings, a completed grammar and the
token limit, with the text made final so far (incremental detokenisation)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .constrain import DEAD_END
from .stopping import StopMatcher
from .tokenizer import IncrementalDecoder


class TokenAccept:
    """Feeds one sequence's tokens; `finish_reason` is set once it ends: "stop" (EOS, a stop string, the
    grammar complete), "length" (max_tokens accepted) or DEAD_END (the grammar allows no token)."""

    def __init__(self, decode, *, max_tokens: int, stop: tuple[str, ...] = (), eos=frozenset(), matcher=None):
        self.decoder = IncrementalDecoder(decode)
        self.stop = StopMatcher(tuple(stop))
        self.max_tokens, self.eos, self.matcher = max_tokens, frozenset(eos), matcher
        self.accepted = 0  # tokens accepted, EOS included
        self.finish_reason: str | None = None

    def pick(self, logits: np.ndarray, sample: Callable[[np.ndarray], int]) -> int | None:
        """The next token: the grammar's mask, then `sample`; None when the grammar allows none (the sequence ends)."""
        if self.matcher is not None:
            logits = self.matcher.apply(np.asarray(logits))
            if logits is None:
                self.finish_reason = DEAD_END
                return None
        return int(sample(logits))

    def accept(self, token: int) -> str:
        """Text that became final with this token (may be empty); sets `finish_reason` when the sequence ends."""
        self.accepted += 1
        if token in self.eos:
            return self.end("stop")
        text = self.stop.feed(self.decoder.push(token))
        complete = self.matcher is not None and (not self.matcher.accept(token) or self.matcher.done)
        if self.stop.stopped:
            self.finish_reason = "stop"
        elif complete:  # nothing but EOS may follow
            return text + self.end("stop")
        elif self.accepted >= self.max_tokens:
            return text + self.end("length")
        elif self.matcher is not None:
            self.matcher.prefetch()  # the next mask is computed while the forward pass runs
        return text

    def end(self, reason: str | None = None) -> str:
        """End the sequence (a reason already set stays); the text held back until now."""
        self.finish_reason = self.finish_reason or reason
        return self.stop.feed(self.decoder.flush()) + self.stop.flush()
