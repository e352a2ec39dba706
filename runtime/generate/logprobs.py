"""Token log-probabilities: log_softmax of the model's own logits (before temperature, top-p or a
grammar mask, as OpenAI and vLLM report them), the chosen token's and the N most likely."""

from __future__ import annotations

import numpy as np

TOP_LOGPROBS_MAX = 20  # OpenAI's limit for top_logprobs


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities over the last axis."""
    x = np.asarray(logits, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """(log p(token), [(id, log p)] of the `top` most likely, most likely first, ties by id) for logits [V]."""
    lp = log_softmax(logits)
    return float(lp[token]), top_of(lp, top)


def top_of(lp: np.ndarray, top: int) -> list[tuple[int, float]]:
    if top <= 0:
        return []
    k = min(top, lp.shape[-1])
    part = np.argpartition(-lp, k - 1)[:k]
    part = part[np.lexsort((part, -lp[part]))]
    return [(int(i), float(lp[i])) for i in part]


def prompt_logprobs(chunks, tokens: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """Per prompt position: None for the first token, else (log p(token | the ones before), top list).

    chunks: the prefill's logits in order, each [S, V] for consecutive positions; reduced chunk by chunk
    so a long prompt never holds [T, V] log-probabilities at once."""
    out: list = [None]
    pos = 0
    for logits in chunks:
        lp = log_softmax(logits)
        for row in lp:
            nxt = pos + 1
            if nxt < len(tokens):
                out.append((float(row[tokens[nxt]]), top_of(row, top)))
            pos += 1
    return out
