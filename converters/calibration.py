"""Calibration and evaluation text -> fixed windows of token ids (deterministic for a given input)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.errors import ConversionError

from .tiny import default_calibration_text

EVAL_FRACTION = 0.2  # tail of the default corpus kept out of calibration for the accuracy report


@dataclass(frozen=True)
class TokenWindows:
    ids: list[list[int]]  # nsamples x seqlen
    sha256: str  # of the token ids, so the manifest records exactly what calibrated the model

    @property
    def nsamples(self) -> int:
        return len(self.ids)


def read_text(path: str | Path) -> str:
    """Plain text, or JSONL with a "text" field per line."""
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"{p}: calibration/evaluation file not found", hint="pass a .txt file or a .jsonl file with a \"text\" field per line")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix in (".jsonl", ".json"):
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConversionError(f"{p}:{n}: not a JSON line ({exc})", hint="one JSON object per line with a \"text\" field") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ConversionError(f"{p}:{n}: no \"text\" string field", hint="one JSON object per line with a \"text\" field")
            texts.append(row["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise ConversionError(f"{p}: no text", hint="calibration needs a few thousand tokens of representative text")
    return raw


def split_default(tokens: list[int]) -> tuple[list[int], list[int]]:
    cut = int(len(tokens) * (1 - EVAL_FRACTION))
    return tokens[:cut], tokens[cut:]


def windows(tokens: list[int], nsamples: int, seqlen: int, bos: int | None) -> TokenWindows:
    """nsamples windows of seqlen tokens taken in order; the stream is repeated when it is shorter."""
    if nsamples <= 0 or seqlen <= 1:
        raise ConversionError(f"nsamples ({nsamples}) must be > 0 and seqlen ({seqlen}) > 1")
    if not tokens:
        raise ConversionError("calibration text gives no tokens")
    body = seqlen - (bos is not None)
    need = nsamples * body
    stream = (tokens * (need // len(tokens) + 1))[:need]
    ids = [([bos] if bos is not None else []) + stream[i * body:(i + 1) * body] for i in range(nsamples)]
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return TokenWindows(ids, digest)


def tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def default_text() -> str:
    return default_calibration_text()
