"""logprobs in OpenAI's two shapes: chat (`choices[].logprobs.content`) and completions (the legacy
`tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists), from (token id, log p, top) entries."""

from __future__ import annotations

import math
from functools import lru_cache

Entry = tuple  # (token id, log p or None, [(id, log p)] or None)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character each byte is written as, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Token id -> (text, UTF-8 bytes) for one tokenizer; a token holding part of a character keeps its
    exact bytes (its text then shows U+FFFD, as OpenAI's does)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._added = getattr(tokenizer, "added_token_ids", frozenset())

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            hit = self._cache[token] = self._lookup(token)
        return hit

    def _lookup(self, token: int) -> tuple[str, list[int]]:
        raw = None
        id_to_token = getattr(self.tokenizer, "id_to_token", None)
        if id_to_token is not None:
            piece = id_to_token(int(token))
            table = _byte_decoder()
            if piece is not None and all(ch in table for ch in piece) and int(token) not in self._added:
                raw = bytes(table[ch] for ch in piece)
        if raw is None:
            decode = getattr(self.tokenizer, "decode")
            try:
                text = decode([int(token)], skip_special_tokens=False)
            except TypeError:
                text = decode([int(token)])
            raw = text.encode("utf-8")
        return raw.decode("utf-8", errors="replace"), list(raw)


def _finite(lp: float) -> float:
    return lp if math.isfinite(lp) else -9999.0  # JSON has no -Infinity


def chat_logprobs(entries: list[Entry], text_of: TokenText) -> dict:
    content = []
    for token, lp, top in entries:
        text, raw = text_of(token)
        alts = []
        for t, l in top or ():
            s, b = text_of(t)
            alts.append({"token": s, "logprob": _finite(l), "bytes": b})
        content.append({"token": text, "logprob": _finite(lp), "bytes": raw, "top_logprobs": alts})
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[Entry], text_of: TokenText, offset: int = 0) -> dict:
    """entries may start with prompt tokens whose log p is None (the first token of an echoed prompt)."""
    tokens, lps, tops, offsets = [], [], [], []
    for token, lp, top in entries:
        text, _ = text_of(token)
        tokens.append(text)
        lps.append(None if lp is None else _finite(lp))
        tops.append(None if top is None else {text_of(t)[0]: _finite(l) for t, l in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
