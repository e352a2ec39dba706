"""Validation of OpenAI request bodies into SamplingParams; every problem names the field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import ConfigError
from .engine import SamplingParams

ROLES = ("system", "user", "assistant", "developer")  # developer: OpenAI's newer name for system
SEED_MAX = 2**63 - 1
TOKEN_ID_MAX = 2**31 - 1  # above any tokenizer; the model's own vocabulary is checked by the API


class BadRequest(ConfigError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _number(data: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = data.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{key}' must be a number, got {v!r}", key)
    if not math.isfinite(v):
        raise BadRequest(f"'{key}' must be a finite number, got {v}", key)
    if v > hi or v < lo or (lo_open and v == lo):
        raise BadRequest(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key)
    return float(v)


def _int(data: dict, key: str, default: int | None, lo: int) -> int | None:
    v = data.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{key}' must be an integer, got {v!r}", key)
    if v < lo:
        raise BadRequest(f"'{key}' must be >= {lo}, got {v}", key)
    return v


# Fields each endpoint honours. A field outside these is refused rather than silently ignored;
# OpenAI fields we do not implement pass only at their neutral value.
COMMON_FIELDS = frozenset({"model", "max_tokens", "stop", "n", "stream", "stream_options", "seed", "temperature", "top_p",
                           "logprobs", "response_format", "json_schema", "regex", "grammar", "user", "speculative"})
ENDPOINT_FIELDS = {
    "completions": COMMON_FIELDS | {"prompt", "echo"},
    "chat": COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice"},
}
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "best_of": (1,),
           "suffix": ("",), "parallel_tool_calls": (True, False)}


SPEC_METHODS = ("prompt_lookup", "draft")
SPEC_KEYS = {"type", "k", "ngram"}
SPEC_K_MAX = 16  # runtime/generate/speculative.py K_MAX
SPEC_NGRAM_MAX = 8


@dataclass(frozen=True)
class SpecRequest:
    """A request's `speculative`: method "server" (true: what the server runs, prompt lookup when it runs
    none), "prompt_lookup" or "draft"; k and ngram None: the server's."""

    method: str
    k: int | None = None
    ngram: int | None = None


def _speculative(data: dict):
    """None (the server's setting), False (off) or a SpecRequest."""
    v = data.get("speculative")
    if v is None or v is False:
        return v
    if v is True:
        return SpecRequest("server")
    shape = 'false, true or {"type": "prompt_lookup" | "draft", "k": 1-16, "ngram": 1-8}'
    if not isinstance(v, dict):
        raise BadRequest(f"'speculative' must be {shape}, got {v!r}", "speculative")
    unknown = sorted(set(v) - SPEC_KEYS, key=str)
    if unknown:
        raise BadRequest(f"'speculative' has unknown key(s) {', '.join(map(repr, unknown))}; known: type, k, ngram", "speculative")
    method = v.get("type")
    if method not in SPEC_METHODS:
        raise BadRequest(f"'speculative.type' must be \"prompt_lookup\" or \"draft\", got {method!r}", "speculative")
    k, ngram = _spec_int(v, "k", SPEC_K_MAX), _spec_int(v, "ngram", SPEC_NGRAM_MAX)
    if ngram is not None and method != "prompt_lookup":
        raise BadRequest("'speculative.ngram' goes with type \"prompt_lookup\" only", "speculative")
    return SpecRequest(method, k, ngram)


def _spec_int(v: dict, key: str, hi: int) -> int | None:
    n = v.get(key)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= hi):
        raise BadRequest(f"'speculative.{key}' must be an integer in [1, {hi}], got {n!r}", "speculative")
    return n


def check_fields(data: dict, endpoint: str) -> None:
    """Refuse a field this endpoint does not honour (one line naming it), in a stable order."""
    for key in sorted(data, key=str):
        if key in ENDPOINT_FIELDS[endpoint] or data[key] is None:
            continue
        if key in NEUTRAL:
            if any(type(data[key]) is type(v) and data[key] == v for v in NEUTRAL[key]):
                continue
            raise BadRequest(f"'{key}' is not supported by this server (send it only as {NEUTRAL[key][0]!r}, or leave it out)", key)
        raise BadRequest(f"unknown field {key!r} for /v1/{'chat/' if endpoint == 'chat' else ''}completions: "
                         "this server refuses what it would not honour", key)


def _common(data: dict, max_tokens_default: int) -> tuple[SamplingParams, bool, bool]:
    least = 0 if data.get("echo") is True else 1  # echo with max_tokens 0 scores the prompt alone
    max_tokens = _int(data, "max_completion_tokens", None, 1) or _int(data, "max_tokens", max_tokens_default, least)
    stop = data.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (_text(stop, "stop"),)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stop = tuple(stop)
        for s in stop:
            _text(s, "stop")
    else:
        raise BadRequest(f"'stop' must be a string or a list of up to 4 strings, got {stop!r}", "stop")
    if _int(data, "n", 1, 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {stream!r}", "stream")
    opts = data.get("stream_options")
    opts = {} if opts is None else opts
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    if not isinstance(opts.get("include_usage", False), bool):
        raise BadRequest(f"'stream_options.include_usage' must be true or false, got {opts['include_usage']!r}", "stream_options")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest(f"'user' must be a string, got {user!r}", "user")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"'seed' must be an integer, got {seed!r}", "seed")
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise BadRequest(f"'seed' must be in [0, 2^63-1], got {seed}; omit it for a random one", "seed")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=seed,
        stop=stop,
        speculative=_speculative(data),
    )
    return params, stream, bool(stream and opts.get("include_usage"))


def parse_completion(data: dict, max_tokens_default: int):
    """(prompt text or token ids, params, stream, include_usage)."""
    check_fields(data, "completions")
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= TOKEN_ID_MAX for t in prompt):
            raise BadRequest("'prompt' must be a string, a list with one string, or a non-empty list of token ids", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' is required: a non-empty string (batches of prompts are not supported; send them as separate requests)", "prompt")
    else:
        _text(prompt, "prompt")
    return (prompt, *_common(data, max_tokens_default))


def _text(s: str, param: str) -> str:
    """s itself, when it is valid Unicode text (JSON's \\uD800 escapes can carry lone surrogates)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"'{param}' holds an invalid character at {exc.start} (a lone UTF-16 surrogate)", param) from None
    return s


def _content(msg: dict, i: int) -> str:
    content = msg.get("content")
    if content is None and msg.get("role") == "assistant":  # e.g. one that only calls tools
        return ""
    if isinstance(content, str):
        return _text(content, f"messages[{i}].content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return _text("".join(parts), f"messages[{i}].content")
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat(data: dict, max_tokens_default: int):
    """(messages as [{"role", "content"}], params, stream, include_usage)."""
    check_fields(data, "chat")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required: a non-empty list of {role, content} objects", "messages")
    out = []
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ROLES + ("tool",):
            raise BadRequest(f"messages[{i}] must be an object whose role is one of {', '.join(ROLES)}, tool", f"messages[{i}].role")
        if role == "tool" or (role == "assistant" and msg.get("tool_calls") is not None):
            from .tools import check_message

            out.append(check_message(msg, i, _content(msg, i)))
            continue
        out.append({"role": "system" if role == "developer" else role, "content": _content(msg, i)})
    return (out, *_common(data, max_tokens_default))
