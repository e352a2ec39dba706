"""What a request asks beyond sampling: an output constraint (response_format, and the extra_body
fields `regex`, `grammar`, `json_schema`), logprobs / top_logprobs, echo, tools. Parsed and compiled in
the HTTP handler (a bad grammar is a 400 there, never work for the scheduler thread); the scheduler
then drives the request's matcher (runtime/generate/accept.py) and logprobs token by token."""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np

from ...errors import ConfigError, MissingDependencyError
from ..generate.constrain import Constraint, GrammarCompiler, Matcher, constraint
from ..generate.logprobs import TOP_LOGPROBS_MAX, log_softmax, prompt_logprobs, top_of
from .requests import BadRequest

_COMPILERS: "weakref.WeakKeyDictionary[object, GrammarCompiler]" = weakref.WeakKeyDictionary()
_BUILDING = threading.Lock()  # one tokenizer view per model, however many requests ask at once
log = logging.getLogger(__name__)


@dataclass
class RequestOptions:
    constraint: Constraint | None = None
    logprobs: int | None = None  # None: off; N: the chosen token's and N alternatives
    echo: bool = False  # completions: the prompt's tokens (and their logprobs) come first
    matcher: Matcher | None = None  # compiled for this request
    prompt: list | None = None  # echo + logprobs: (token, log p, top) per prompt token
    param: str = "response_format"  # the field the constraint came from, named in errors
    pending: list = field(default_factory=list)  # logprob entries not yet sent with text

    @property
    def active(self) -> bool:
        return self.matcher is not None or self.logprobs is not None or self.echo

    def record(self, logits: np.ndarray, token: int) -> None:
        """With logprobs: the accepted token's log p and the top alternatives, from the unmasked logits."""
        if self.logprobs is not None:
            lp = log_softmax(logits)
            self.pending.append((token, float(lp[token]), top_of(lp, self.logprobs)))

    def take(self) -> list | None:
        if self.logprobs is None:
            return None
        out, self.pending = self.pending, []
        return out

    def prefill_logprobs(self, model, tokens: list[int]) -> None:
        """echo with logprobs: every prompt token's log p given the ones before (the first has none)."""
        fn = getattr(model, "prompt_logits", None)
        if fn is None:
            raise ConfigError("this model cannot report prompt logprobs", hint="drop echo or logprobs")
        per = prompt_logprobs(fn(tokens), tokens, self.logprobs or 0)
        self.prompt = [(t, None, None) if p is None else (t, p[0], p[1]) for t, p in zip(tokens, per)]

    def close(self) -> None:
        if self.matcher is not None:
            self.matcher.close()


def _bool(data: dict, key: str) -> bool:
    v = data.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise BadRequest(f"'{key}' must be true or false, got {v!r}", key)
    return v


def _top(data: dict, key: str) -> int:
    v = data.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= TOP_LOGPROBS_MAX:
        raise BadRequest(f"'{key}' must be an integer in [0, {TOP_LOGPROBS_MAX}], got {v!r}", key)
    return v


def parse_options(data: dict, chat: bool) -> RequestOptions:
    """The request's constraint, logprobs and echo fields, checked (one-line BadRequest)."""
    opts = RequestOptions()
    if chat:
        if _bool(data, "logprobs"):
            opts.logprobs = 0 if data.get("top_logprobs") is None else _top(data, "top_logprobs")
        elif data.get("top_logprobs") is not None:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        if data.get("logprobs") is not None:
            opts.logprobs = _top(data, "logprobs")
        opts.echo = _bool(data, "echo")
        if opts.echo and data.get("stream"):
            raise BadRequest("'echo' cannot be combined with 'stream'; send it without streaming", "echo")
    fields = {k: data.get(k) for k in ("response_format", "json_schema", "regex", "grammar")}
    try:
        opts.constraint = constraint(fields["response_format"], json_schema=fields["json_schema"],
                                     regex=fields["regex"], grammar=fields["grammar"])
    except ConfigError as exc:
        raise BadRequest(exc.message, next((k for k, v in fields.items() if v is not None), None)) from None
    opts.param = next((k for k, v in fields.items() if v is not None), opts.param)
    return opts


def compile_for(model, opts: RequestOptions, param: str | None = None) -> None:
    """Build the request's matcher from the model's tokenizer (call it off the event loop: a large
    schema compiles in tens of milliseconds)."""
    if opts.constraint is None:
        return
    param = param or opts.param
    try:
        compiler = compiler_for(model, param)
        opts.matcher = compiler.matcher(opts.constraint)
    except MissingDependencyError as exc:
        raise BadRequest(f"constrained decoding needs llguidance: {exc.hint}", param) from None
    except BadRequest:
        raise
    except ConfigError as exc:
        raise BadRequest(exc.message, param) from None


def compiler_for(model, param: str | None = None) -> GrammarCompiler:
    """The model's grammar compiler, built once (its tokenizer view takes seconds on a large vocabulary)."""
    with _BUILDING:
        compiler = _COMPILERS.get(model)
        if compiler is None:
            tok = getattr(model, "tokenizer", None)
            if tok is None or not hasattr(tok, "serialized"):
                raise BadRequest("this model serves no tokenizer that constrained decoding can use", param)
            try:
                compiler = GrammarCompiler.for_tokenizer(tok, int(getattr(model, "vocab_size", 0)))
            except ValueError as exc:  # the engine cannot read this tokenizer.json
                why = (str(exc) or type(exc).__name__).splitlines()[0]
                raise BadRequest(f"constrained decoding cannot use this model's tokenizer ({why}); leave the constraint out", param) from None
            _COMPILERS[model] = compiler
        return compiler


def warm(model) -> threading.Thread:
    """Build the grammar compiler in the background at daemon start, so the first constrained request
    does not wait for it; without llguidance (or a tokenizer) nothing is built and requests say why."""
    def build():
        try:
            compiler_for(model)
        except (MissingDependencyError, BadRequest, ConfigError) as exc:
            log.debug("constrained decoding not prepared: %s", exc)
        except Exception as exc:  # one line in the log, not a thread traceback; requests say why when they ask
            log.warning("constrained decoding not prepared: %s: %s", type(exc).__name__, exc)

    t = threading.Thread(target=build, name="grammar-warm", daemon=True)
    t.start()
    return t


def writes_r1_turns(tok) -> bool:
    """Whether the bundle's chat template speaks DeepSeek-R1/V3's turns (the tool format's); no template: R1's built in."""
    from edge_sdk.chat import ASSISTANT

    template = getattr(tok, "chat_template", None)
    return not isinstance(template, str) or ASSISTANT in template


def chat_ids(model, messages: list[dict], tools, opts: RequestOptions) -> list[int]:
    """The chat prompt's token ids: DeepSeek's tool format when tools or tool messages are in play. With
    tool_choice required or named, the tool-call grammar becomes the request's constraint; a constrained
    reply starts after the reasoning block, closed in the prompt."""
    from edge_sdk.chat import THINK_CLOSE, THINK_OPEN
    from . import tools as toolkit

    tok = getattr(model, "tokenizer", None)
    if tools is not None and tools.constrained:
        if opts.constraint is not None:
            raise BadRequest("tool_choice required or named already constrains the reply; drop response_format", "response_format")
        marker_id = getattr(tok, "added_token_id", None)
        opts.constraint = toolkit.constraint(tools, marker_id or (lambda s: None))
    if toolkit.uses_tools(messages, tools):
        if tok is None:
            raise BadRequest("this model cannot render tool calls (no tokenizer)", "tools")
        if not writes_r1_turns(tok):
            raise BadRequest("this model's chat template has no tool-call format (DeepSeek-R1/V3's tool calls need its "
                             "<｜User｜>/<｜Assistant｜> turns; DeepSeek-V2-Chat writes plain 'User:'/'Assistant:' turns): "
                             "send the request without tools and tool messages", "tools")
        ids = tok.encode(toolkit.render(messages, tools, tok.bos_token), add_special_tokens=False)
    else:
        ids = model.encode_chat(messages)
    if opts.constraint is not None and tok is not None and \
            tok.decode(ids[-4:], skip_special_tokens=False).endswith(THINK_OPEN + "\n"):
        ids = ids + tok.encode(THINK_CLOSE + "\n\n", add_special_tokens=False)
    return ids
