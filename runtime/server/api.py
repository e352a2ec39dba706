"""OpenAI-compatible HTTP API (Starlette): /v1/models, /v1/completions, /v1/chat/completions,
/health, /metrics. Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ...chat import THINK_OPEN, ThinkSplit, split_think
from ...errors import EdgeSDKError
from .engine import SamplingParams, StepModel
from .memory import MemoryBusyError, MemoryManager, RequestTooLargeError, process_rss_bytes
from .metrics import Metrics
from .requests import BadRequest, parse_chat, parse_completion
from .logprobs import TokenText, chat_logprobs, completion_logprobs
from .scheduler import Event, Request, Scheduler
from .structured import chat_ids, compile_for, parse_options
from .tools import CallStream, parse_output, parse_tools


MAX_JSON_DEPTH = 32  # OpenAI bodies nest 4 deep; Python's parser recurses, ~1,000 levels raise RecursionError
# a string, or an unterminated one up to the end: never restarts inside a string, so linear in the body
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)


def json_depth(body: bytes) -> int:
    """Deepest [ / { nesting of a JSON text, brackets inside strings not counted (linear, no recursion)."""
    structure = np.frombuffer(_JSON_STRING.sub(b"", body), np.uint8)
    steps = np.isin(structure, (0x5B, 0x7B)).astype(np.int64) - np.isin(structure, (0x5D, 0x7D))
    return int(np.cumsum(steps).max(initial=0))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; send finite numbers only")


def parse_json(body: bytes):
    """The body as JSON, or APIError 400: invalid UTF-8 or JSON, NaN/Infinity, nesting over MAX_JSON_DEPTH."""
    if json_depth(body) > MAX_JSON_DEPTH:
        raise APIError(400, f"the body nests JSON deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, over-long integers
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None


@dataclass
class ServerState:
    """Everything the handlers read; the daemon swaps `api_key` and limits on SIGHUP."""

    model: StepModel
    scheduler: Scheduler
    memory: MemoryManager
    metrics: Metrics
    model_id: str
    api_key: str = ""
    max_request_bytes: int = 1_048_576
    max_tokens_default: int = 256
    power_mode: Callable[[], str | None] = lambda: None
    extra_gauges: Callable[[], dict] = dict
    started: float = field(default_factory=time.time)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error_from(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BadRequest):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, RequestTooLargeError):
        code = "context_length_exceeded" if "context" in exc.message else "request_too_large"
        return APIError(exc.http_status, str(exc), code=code)
    if isinstance(exc, MemoryBusyError):
        return APIError(exc.http_status, str(exc), "server_error", "overloaded", headers={"Retry-After": str(max(1, round(exc.retry_after_s)))})
    if isinstance(exc, EdgeSDKError):
        return APIError(500, str(exc), "server_error", "internal_error")
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error")


def create_app(state: ServerState) -> Starlette:
    def authorize(request: HTTPRequest) -> None:
        if not state.api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Pass the daemon's key as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    async def read_json(request: HTTPRequest) -> dict:
        limit = state.max_request_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise APIError(413, f"request body is larger than {limit} bytes (server.max_request_bytes)", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body is larger than {limit} bytes (server.max_request_bytes)", code="request_too_large")
        data = parse_json(bytes(body))
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        model = data.get("model")
        if not (model is None or isinstance(model, str)):
            raise APIError(400, f"'model' must be a string, got {model!r}", param="model", code="invalid_value")
        if model not in (None, "", state.model_id):
            raise APIError(404, f"model {model!r} is not served here; this daemon serves {state.model_id!r}",
                           code="model_not_found", param="model")
        return data

    def endpoint(name: str, handler):
        async def wrapped(request: HTTPRequest) -> Response:
            try:
                response = await handler(request)
            except Exception as exc:  # every failure leaves in OpenAI's error shape
                err = api_error_from(exc)
                state.metrics.count_request(name, err.status)
                if err.status in (413, 503):
                    state.metrics.rejected += 1
                return err.response()
            state.metrics.count_request(name, response.status_code)
            return response
        return wrapped

    async def models(request: HTTPRequest) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_id, "object": "model", "created": int(state.started), "owned_by": "edge-sdk"}]})

    async def completions(request: HTTPRequest) -> Response:
        authorize(request)
        data = await read_json(request)
        prompt, params, stream, include_usage = parse_completion(data, state.max_tokens_default)
        opts = parse_options(data, chat=False)
        ids = check_ids(prompt) if isinstance(prompt, list) else state.model.encode(prompt)
        await asyncio.to_thread(compile_for, state.model, opts)
        return await generate(request, ids, params, stream, include_usage, chat=False, opts=opts)

    async def chat(request: HTTPRequest) -> Response:
        authorize(request)
        data = await read_json(request)
        messages, params, stream, include_usage = parse_chat(data, state.max_tokens_default)
        opts, tools = parse_options(data, chat=True), parse_tools(data)
        ids = chat_ids(state.model, messages, tools, opts)
        await asyncio.to_thread(compile_for, state.model, opts, "tool_choice" if tools and tools.constrained else None)
        return await generate(request, ids, params, stream, include_usage, chat=True, opts=opts, tools=tools)

    def check_ids(ids: list[int]) -> list[int]:
        vocab = getattr(state.model, "vocab_size", None)
        bad = next((t for t in ids if vocab is not None and t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"'prompt' holds token id {bad}, outside the model's vocabulary [0, {vocab - 1}]",
                           param="prompt", code="invalid_value")
        return ids

    async def generate(request: HTTPRequest, ids: list[int], params: SamplingParams, stream: bool, include_usage: bool, chat: bool,
                       opts=None, tools=None) -> Response:
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens; send some text", param="prompt", code="invalid_value")
        req = state.scheduler.submit(ids, params, asyncio.get_running_loop(), options=opts if opts is not None and opts.active else None)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        watcher = asyncio.ensure_future(until_disconnect(request))
        handed_over = False
        try:
            if stream:
                # headers wait for admission and the first token: a request that times out in the
                # queue still gets a real 503, not a 200 with an error inside
                first = await next_event(req, watcher)
                watcher.cancel()
                handed_over = True
                think = ThinkSplit(in_think=starts_in_think(ids)) if chat else None
                events = sse(req, first, rid, created, think, include_usage) if not (tools and tools.choice != "none") else \
                    tool_sse(req, first, rid, created, think, include_usage)
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            parts, lps = [], []
            while (ev := await next_event(req, watcher)).kind == "text":
                parts.append(ev.text)
                lps += ev.logprobs or []
            text, reason = "".join(parts), ev.finish_reason
            lps += ev.logprobs or []
        finally:
            watcher.cancel()
            if not handed_over and req.finish_reason is None:
                req.cancel()
        usage = usage_of(req)
        want_lp = opts is not None and opts.logprobs is not None
        if chat:
            message = {"role": "assistant", **answer_fields(text, ids)}
            if tools and tools.choice != "none":
                content, calls = parse_output(raw_text(req.completion_ids))
                if calls:
                    message, reason = {"role": "assistant", "content": content or None, "tool_calls": calls}, "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": chat_logprobs(lps, token_text()) if want_lp else None,
                      "finish_reason": reason}
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_id,
                                 "choices": [choice], "usage": usage})
        if opts is not None and opts.echo:
            text = state.model.decode(ids) + text
            lps = (opts.prompt or [(t, None, None) for t in ids]) + lps
        choice = {"index": 0, "text": text, "logprobs": completion_logprobs(lps, token_text()) if want_lp else None,
                  "finish_reason": reason}
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.model_id,
                             "choices": [choice], "usage": usage})

    async def until_disconnect(request: HTTPRequest) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def next_event(req: Request, watcher: asyncio.Future) -> Event:
        """The request's next event; raises its error, or cancels it when the client hangs up first."""
        getter = asyncio.ensure_future(req.events.get())
        done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            req.cancel()
            raise APIError(499, "client closed the request", code="client_closed")
        ev: Event = getter.result()
        if ev.kind == "error":
            raise ev.error
        return ev

    def starts_in_think(ids: list[int]) -> bool:
        """The chat prompt ends inside a `<think>` block (DeepSeek-R1's generation prompt)."""
        return raw_text(ids[-4:]).rstrip().endswith(THINK_OPEN)

    def answer_fields(text: str, ids: list[int]) -> dict:
        """A chat reply as DeepSeek's API returns it: the reasoning in `reasoning_content`, the answer in `content`."""
        in_think = starts_in_think(ids)
        if not in_think and THINK_OPEN not in text:
            return {"content": text}
        reasoning, answer = split_think(text, in_think)
        return {"content": answer, "reasoning_content": reasoning}

    def think_deltas(think: ThinkSplit, text: str, final: bool) -> list[dict]:
        """Streamed chat text as deltas: `reasoning_content` inside <think>, `content` after it."""
        reasoning, answer = think.feed(text)
        if final:
            r2, a2 = think.flush()
            reasoning, answer = reasoning + r2, answer + a2
        return [d for d in ({"reasoning_content": reasoning}, {"content": answer}) if next(iter(d.values()))]

    async def sse(req: Request, first: Event, rid: str, created: int, think: ThinkSplit | None, include_usage: bool):
        chat = think is not None
        obj = "chat.completion.chunk" if chat else "text_completion"

        offset = 0

        def chunk(delta_text: str | dict | None, reason: str | None, role: bool = False, lps=None) -> str:
            nonlocal offset
            if chat:
                delta = {"role": "assistant", "content": ""} if role else (delta_text or {})
                lp = None if lps is None else chat_logprobs(lps, token_text())
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                lp = None if lps is None else completion_logprobs(lps, token_text(), offset)
                offset += len(delta_text or "")
                choice = {"index": 0, "text": delta_text or "", "logprobs": lp, "finish_reason": reason}
            body = {"id": rid, "object": obj, "created": created, "model": state.model_id, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk(None, None, role=True)
            ev = first
            while True:
                if ev.kind == "text" and chat:
                    deltas = think_deltas(think, ev.text, final=False) or ([{}] if ev.logprobs else [])
                    for i, d in enumerate(deltas):
                        yield chunk(d, None, lps=ev.logprobs if i == len(deltas) - 1 else None)
                elif ev.kind == "text":
                    yield chunk(ev.text, None, lps=ev.logprobs)
                elif ev.kind == "done":
                    for d in think_deltas(think, "", final=True) if chat else []:
                        yield chunk(d, None)
                    yield chunk(None, ev.finish_reason, lps=ev.logprobs or None)
                    break
                else:
                    yield error_line(ev.error)
                    break
                ev = await req.events.get()
            if include_usage:
                yield usage_line(req, rid, created, obj)
            yield "data: [DONE]\n\n"
        finally:
            if req.finish_reason is None:
                req.cancel()  # the client went away mid-stream

    async def tool_sse(req: Request, first: Event, rid: str, created: int, think: ThinkSplit, include_usage: bool):
        """Chat with tools offered: the reply as it is written, read from its raw text (the call markers are
        special tokens): content (reasoning split off as in sse), then per call one delta with index, id and
        name and the arguments in fragments, as the openai client assembles them; finish_reason tool_calls."""

        def chunk(delta: dict, reason: str | None = None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        def deltas(calls: CallStream, final: bool) -> list[dict]:
            out = []
            for d in calls.feed_ids(list(req.completion_ids), raw_text, state.model.decode, final):
                out += think_deltas(think, d["content"], False) if "content" in d else [d]
            return out + (think_deltas(think, "", True) if final else [])

        try:
            yield chunk({"role": "assistant", "content": ""})
            ev, calls = first, CallStream()
            while ev.kind == "text":
                for d in deltas(calls, False):
                    yield chunk(d)
                ev = await req.events.get()
            if ev.kind == "error":
                yield error_line(ev.error)
            else:
                for d in deltas(calls, True):
                    yield chunk(d)
                yield chunk({}, "tool_calls" if calls.calls else ev.finish_reason)
                if include_usage:
                    yield usage_line(req, rid, created, "chat.completion.chunk")
            yield "data: [DONE]\n\n"
        finally:
            if req.finish_reason is None:
                req.cancel()

    def error_line(err: Exception) -> str:
        """A failure mid-stream: the API error body as one SSE event (the status line went out already)."""
        return f"data: {json.dumps(api_error_from(err).body())}\n\n"

    def usage_of(req: Request) -> dict:
        n_in, n_out = len(req.prompt_ids), len(req.completion_ids)
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    def usage_line(req: Request, rid: str, created: int, obj: str) -> str:
        """stream_options.include_usage: the last chunk, no choices, the request's token counts."""
        body = {"id": rid, "object": obj, "created": created, "model": state.model_id, "choices": [], "usage": usage_of(req)}
        return f"data: {json.dumps(body)}\n\n"

    def raw_text(ids: list[int]) -> str:
        """The completion with its special tokens (the tool-call markers)."""
        tok = getattr(state.model, "tokenizer", None)
        return tok.decode(ids, skip_special_tokens=False) if tok is not None else state.model.decode(ids)

    text_cache: dict = {}

    def token_text() -> TokenText:
        if "t" not in text_cache:
            text_cache["t"] = TokenText(getattr(state.model, "tokenizer", None) or state.model)
        return text_cache["t"]

    async def health(request: HTTPRequest) -> Response:
        failure = state.scheduler.failure
        status = "failed" if failure else "draining" if state.scheduler.draining else "ok"
        mem = state.memory.stats()
        body = {"status": status, "model": state.model_id,
                "running": state.scheduler.running(), "waiting": state.scheduler.queue_depth(),
                "kv_blocks_used": mem["kv_blocks_used"], "kv_blocks_total": mem["kv_blocks_total"],
                "uptime_s": round(time.time() - state.started, 1)}
        if failure:
            body["error"] = f"the scheduler stopped ({failure}); restart the service"
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    async def metrics(request: HTTPRequest) -> Response:
        mem = state.memory.stats()
        gauges = {
            "scheduler_up": ("1 while the scheduler thread serves, 0 once it stopped on a failure.", 0 if state.scheduler.failure else 1),
            "queue_depth": ("Requests waiting for admission.", state.scheduler.queue_depth()),
            "running_requests": ("Requests being generated.", state.scheduler.running()),
            "kv_blocks_total": ("KV cache blocks in the pool.", mem["kv_blocks_total"]),
            "kv_blocks_used": ("KV cache blocks reserved by requests or held as batch padding.", mem["kv_blocks_used"]),
            "kv_usage_ratio": ("Fraction of the KV pool in use.", round(mem["kv_blocks_used"] / max(1, mem["kv_blocks_total"]), 4)),
            "memory_budget_bytes": ("Allocatable unified memory the daemon plans with.", mem["budget_bytes"]),
            "memory_reserve_bytes": ("Part of the budget kept free.", mem["reserve_bytes"]),
            "memory_weights_bytes": ("Model weights.", mem["weights_bytes"]),
            "memory_accounted_bytes": ("Weights + workspace + reserved KV blocks.", mem["accounted_bytes"]),
            "process_resident_bytes": ("Resident set size of the daemon process.", process_rss_bytes()),
        } | state.extra_gauges()
        mode = state.power_mode()
        labelled = {"power_mode_info": ("Current nvpmodel power mode.", {"mode": mode}, 1)} if mode else {}
        return PlainTextResponse(state.metrics.render(gauges, labelled), media_type="text/plain; version=0.0.4")

    async def not_found(request: HTTPRequest, exc) -> Response:
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    async def not_allowed(request: HTTPRequest, exc) -> Response:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed").response()

    routes = [
        Route("/v1/models", endpoint("models", models), methods=["GET"]),
        Route("/v1/completions", endpoint("completions", completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint("chat", chat), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})
