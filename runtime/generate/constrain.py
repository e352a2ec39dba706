"""Constrained decoding: JSON (any object, or a JSON schema), a regex or a Lark grammar, enforced by
masking the logits token by token with llguidance.

llguidance is a Rust library with a numpy binding and no torch: it compiles the grammar lazily and
computes each token mask from the bundle's own tokenizer.json in about a millisecond for a 150k
vocabulary, releasing the GIL, so the next mask is computed on a worker thread while the backend runs
the forward pass. Each sequence carries its own `Matcher`; compiled grammars are cached per text.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.errors import ConfigError, require

DEAD_END = "grammar_dead_end"  # finish_reason when no token can continue the grammar
GRAMMAR_CACHE = 64  # compiled grammars kept per tokenizer (JSON schemas repeat across requests); as many failed ones
# compact JSON with json.dumps' separators; a schema's own "x-guidance" options win
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edge-sdk-mask")


@dataclass(frozen=True)
class Constraint:
    """What the output must match. kind: "json" (json_object), "json_schema", "regex" or "lark"."""

    kind: str
    source: str  # the schema as JSON text, the regex or the grammar

    def grammar(self) -> str:
        llg = require("llguidance", "runtime")
        if self.kind == "json":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
        if self.kind == "json_schema":
            try:
                return llg.LLMatcher.grammar_from_json_schema(self.source, JSON_OPTIONS)
            except ValueError as exc:
                raise ConfigError(f"the JSON schema is not valid JSON ({exc})", hint="send the schema as a JSON object") from None
        if self.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(self.source)
        return llg.LLMatcher.grammar_from_lark(self.source)


def constraint(response_format=None, *, json_schema=None, regex: str | None = None, grammar: str | None = None) -> Constraint | None:
    """The one Constraint the arguments ask for (None: free text); ConfigError when they ask for two or are malformed.

    response_format: OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}},
    or the strings "json"/"json_object"; json_schema: a schema (dict or JSON text); regex; grammar: Lark.
    """
    asked = [c for c in (_from_response_format(response_format),
                         None if json_schema is None else Constraint("json_schema", _schema_text(json_schema)),
                         None if regex is None else Constraint("regex", _nonempty(regex, "regex")),
                         None if grammar is None else Constraint("lark", _nonempty(grammar, "grammar"))) if c]
    if len(asked) > 1:
        raise ConfigError("ask for one output constraint at a time", hint="pass one of response_format, json_schema, regex, grammar")
    return asked[0] if asked else None


def _nonempty(s, name: str) -> str:
    if not isinstance(s, str) or not s:
        raise ConfigError(f"{name} must be a non-empty string, got {s!r}")
    return s


def _schema_text(schema) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ConfigError(f"the JSON schema is not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return json.dumps(schema, sort_keys=True)


def _from_response_format(rf) -> Constraint | None:
    if rf is None:
        return None
    if isinstance(rf, str):
        rf = {"type": {"json": "json_object"}.get(rf, rf)}
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json", "")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise ConfigError("response_format json_schema needs json_schema.schema, the JSON schema itself")
        return Constraint("json_schema", _schema_text(schema))
    raise ConfigError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


class GrammarCompiler:
    """The tokenizer's llguidance view (built once per load: it is slow, docs/runtime.md), a cache of checked
    grammars and one of grammars that failed to build (asked again, they fail with the same error, unbuilt)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...], tokens: int | None = None):
        self._llg = require("llguidance", "runtime")
        # a manifest may list an EOS id past the tokenizer (the model's own, with logits padded past it)
        eos = [t for t in eos_token_ids if tokens is None or 0 <= t < tokens]
        self.tokenizer = self._llg.LLTokenizer(tokenizer_json, eos_token=eos or None)
        self.vocab_size = max(vocab_size, self.tokenizer.vocab_size)  # logits may be padded past the tokenizer
        self._cache: OrderedDict[Constraint, str] = OrderedDict()
        self._failed: OrderedDict[Constraint, ConfigError] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_bundle(cls, bundle_dir, vocab_size: int, eos_token_ids) -> "GrammarCompiler":
        text = (Path(bundle_dir) / "tokenizer.json").read_text(encoding="utf-8")
        tokens = require("tokenizers", "runtime").Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)
        return cls(text, vocab_size, tuple(eos_token_ids), tokens)

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int) -> "GrammarCompiler":
        """From a runtime Tokenizer (serialised: the bundle's tokenizer.json)."""
        return cls(tokenizer.serialized(), vocab_size, tuple(tokenizer.eos_token_ids), tokenizer.vocab_size)

    def matcher(self, c: Constraint) -> "Matcher":
        """A fresh matcher for one sequence; ConfigError when the grammar does not compile or matches nothing."""
        with self._lock:
            failed, grammar = self._failed.get(c), self._cache.get(c)
            for cache, hit in ((self._failed, failed), (self._cache, grammar)):
                if hit is not None:
                    cache.move_to_end(c)
        if failed is not None:
            raise ConfigError(failed.message, hint=failed.hint)
        try:
            m, grammar = self._build(c, grammar)
        except ConfigError as exc:
            self._remember(self._failed, c, exc)
            raise
        self._remember(self._cache, c, grammar)
        return m

    def _build(self, c: Constraint, grammar: str | None) -> tuple["Matcher", str]:
        """A matcher for `c` from its checked grammar text, compiled and checked here when None."""
        if grammar is None:
            grammar = c.grammar()
            error = self._llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
            if error:
                raise ConfigError(f"the {_NAMES[c.kind]} does not compile: {_first_line(error)}",
                                  hint="fix it; JSON schema features the engine lacks are named in the message")
        m = Matcher(self._llg.LLMatcher(self.tokenizer, grammar, log_level=0), self.vocab_size, self.tokenizer.vocab_size)
        if not m.allowed().any() or m.dead:  # the first mask settles whether anything matches
            raise ConfigError(f"the {_NAMES[c.kind]} matches nothing the tokenizer can write", hint="check it accepts at least one string")
        return m, grammar

    def _remember(self, cache: OrderedDict, c: Constraint, value) -> None:
        with self._lock:
            cache[c] = value
            cache.move_to_end(c)
            while len(cache) > GRAMMAR_CACHE:
                cache.popitem(last=False)


_NAMES = {"json": "JSON object format", "json_schema": "JSON schema", "regex": "regex", "lark": "grammar"}


def _first_line(msg: str) -> str:
    return " ".join(msg.strip().split("\n")[:3])[:300]


class Matcher:
    """One sequence's grammar state. `allowed()` is the mask for the next token; `accept(token)` advances.
    `prefetch()` starts the next mask on a worker thread (the engine releases the GIL), so it overlaps
    the forward pass that produces the logits it applies to."""

    def __init__(self, m, vocab_size: int, tokens: int | None = None):
        self._m, self.vocab_size = m, vocab_size
        self._tokens = min(vocab_size, tokens or vocab_size)
        self._bits = np.zeros((tokens or vocab_size) + 31 >> 5, np.int32)  # the engine wants exactly the tokenizer's width
        self._allowed = np.zeros(vocab_size, bool)  # ids past the tokenizer (padded logits) stay False
        self._out: np.ndarray | None = None  # masked logits, reused step after step
        self._pending: Future | None = None
        self._mask: np.ndarray | None = None

    @property
    def dead(self) -> bool:
        """No string can continue what was generated so far (a regex matching nothing is dead at once)."""
        return self._m.is_stopped() and not self._m.is_accepting()

    def _compute(self) -> np.ndarray:
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), count=self._tokens, bitorder="little")
        self._allowed[:self._tokens] = bits  # in place: apply() has consumed the previous mask
        return self._allowed

    def prefetch(self) -> None:
        if self._pending is None and self._mask is None:
            self._pending = _POOL.submit(self._compute)

    def allowed(self) -> np.ndarray:
        """bool [V]: the tokens that may come next (EOS where the grammar may end); a buffer reused after accept()."""
        if self._mask is None:
            if self._pending is not None:
                self._mask, self._pending = self._pending.result(), None
            else:
                self._mask = self._compute()
        return self._mask

    def apply(self, logits: np.ndarray) -> np.ndarray | None:
        """logits [V] with the disallowed tokens at -inf (a buffer reused at the next call); None at a dead end."""
        allowed = self.allowed()  # first: it waits for a prefetch still using the matcher
        if self.dead:
            return None
        n = min(len(allowed), logits.shape[-1])
        if not allowed[:n].any():
            return None
        if self._out is None or self._out.shape != logits.shape:
            self._out = np.empty(logits.shape, np.float32)
        out = self._out
        out.fill(-np.inf)
        np.copyto(out[:n], logits[:n], where=allowed[:n])
        return out

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False when it breaks the grammar."""
        self._mask = None
        return bool(self._m.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar is complete and takes nothing but EOS."""
        return self._m.is_stopped() and self._m.is_accepting()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

