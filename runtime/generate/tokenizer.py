"""The bundle's tokenizer through `tokenizers` (never transformers), and streaming detokenization."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edge_sdk.errors import BundleError, ConfigError, require


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    """Encode/decode with the special tokens the bundle's manifest names."""

    def __init__(self, bundle_dir: str | Path, meta: dict | None = None):
        tk = require("tokenizers", "runtime")
        root = Path(bundle_dir)
        path = root / "tokenizer.json"
        if not path.exists():
            raise BundleError(f"{root}: tokenizer.json is missing", hint="re-convert the model; bundles ship tokenizer.json")
        self._tok = tk.Tokenizer.from_file(str(path))
        cfg_path = root / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        meta = meta or {}
        self.chat_template: str | None = meta.get("chat_template") or cfg.get("chat_template")
        self.bos_token_id = meta.get("bos_token_id", self._id_of(_token_text(cfg.get("bos_token"))))
        eos = meta.get("eos_token_ids")
        if eos is None:
            eos_id = self._id_of(_token_text(cfg.get("eos_token")))
            eos = [] if eos_id is None else [eos_id]
        self.eos_token_ids: tuple[int, ...] = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        pad = meta.get("pad_token_id", self._id_of(_token_text(cfg.get("pad_token"))))
        self.pad_token_id: int = int(pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0))
        self.add_bos = bool(cfg.get("add_bos_token", False))

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token(self) -> str:
        return "" if self.bos_token_id is None else (self._tok.id_to_token(self.bos_token_id) or "")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included (what two tokenizers must share to be interchangeable)."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def added_token_ids(self) -> frozenset[int]:
        """Ids of the added (special) tokens: markers written whole, never as byte pieces."""
        return frozenset(self._tok.get_added_tokens_decoder())

    def added_token_id(self, text: str) -> int | None:
        """The id of `text` when the tokenizer holds it as one added token, else None."""
        tid = self._tok.token_to_id(text)
        return tid if tid is not None and tid in self.added_token_ids else None

    def serialized(self) -> str:
        """The tokenizer as tokenizer.json text (what a grammar engine builds its token view from)."""
        return self._tok.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary piece of an id (byte-level BPE: bytes written as printable characters)."""
        return self._tok.id_to_token(int(token_id))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ConfigError(f"a prompt must be a string, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@dataclass
class IncrementalDecoder:
    """Turns a growing token list into text chunks whose concatenation equals decode(all tokens).

    Byte-level BPE splits a character over several tokens; a chunk is emitted only when its text
    no longer ends in an incomplete character (U+FFFD). Each step decodes a short window (from the
    start of the last emitted chunk), not the whole sequence. `tokenizer`: a Tokenizer, or any
    `decode(ids) -> str` callable (the daemon's step model).
    """

    tokenizer: Tokenizer | Callable[[list[int]], str]
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    _emitted: list[str] = field(default_factory=list)
    _prefix: int = 0  # window start: context so that leading-space rules decode as in the full text
    _read: int = 0  # tokens up to here are emitted

    def _decode(self, ids) -> str:
        if callable(self.tokenizer):
            return self.tokenizer(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before) or not text.startswith(before):
            return ""
        new = text[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self._emitted.append(new)
        return new

    def flush(self) -> str:
        full, done = self._decode(self.ids), "".join(self._emitted)
        new = full[len(done):] if full.startswith(done) else ""
        self._emitted = [full if new else done]
        self._prefix = self._read = len(self.ids)
        return new
