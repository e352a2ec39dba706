"""Tool calls in DeepSeek's own chat format.

DeepSeek-R1/V3's template writes an assistant's calls as
`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>`
(more calls joined by a newline) then `<｜tool▁calls▁end｜><｜end▁of▁sentence｜>`, and tool results as
`<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>`, the
assistant's next turn following the outputs without another `<｜Assistant｜>`. The template does not
render the tool definitions: they go into the system prompt. With tool_choice "required" or a named
function, the output is constrained (a Lark grammar with each function's parameters as a JSON schema).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from edge_sdk.chat import ASSISTANT, EOS, THINK_CLOSE, THINK_OPEN, USER
from ..generate.constrain import Constraint
from .requests import BadRequest

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
_CALL = re.compile(re.escape(CALL_BEGIN) + r"(\w+)" + re.escape(SEP) + r"([A-Za-z0-9_-]+)\n```json\n(.*?)\n```" + re.escape(CALL_END), re.DOTALL)


@dataclass(frozen=True)
class Tools:
    functions: tuple[dict, ...]  # {"name", "description", "parameters"}
    choice: str  # "auto" | "none" | "required" | a function's name

    @property
    def constrained(self) -> bool:
        return self.choice not in ("auto", "none")


def parse_tools(data: dict) -> Tools | None:
    """The request's `tools` and `tool_choice`, checked; None when it offers no tools."""
    tools, choice = data.get("tools"), data.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise BadRequest("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise BadRequest(f"'tools' must be a list of 1 to {MAX_TOOLS} tools", "tools")
    functions = tuple(_function(t, i) for i, t in enumerate(tools))
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise BadRequest("'tools' holds two functions with the same name", "tools")
    return Tools(functions, _choice(choice, names))


def _function(tool, i: int) -> dict:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
    if not isinstance(fn, dict):
        raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}", f"tools[{i}]")
    name, desc, params = fn.get("name"), fn.get("description", ""), fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(name, str) or not NAME.match(name):
        raise BadRequest(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {name!r}", f"tools[{i}].function.name")
    if not isinstance(desc, str):
        raise BadRequest(f"tools[{i}].function.description must be a string", f"tools[{i}].function.description")
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema of type object (the arguments are a JSON object)",
                         f"tools[{i}].function.parameters")
    return {"name": name, "description": desc, "parameters": params}


def _choice(choice, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name is None:
        raise BadRequest("'tool_choice' must be auto, none, required or {'type': 'function', 'function': {'name'}}", "tool_choice")
    if name not in names:
        raise BadRequest(f"'tool_choice' names {name!r}, which is not in 'tools'", "tool_choice")
    return name


def check_message(msg: dict, i: int, content: str) -> dict:
    """A tool result or an assistant message with tool_calls, as the renderer reads it."""
    if msg.get("role") == "tool":
        call_id = msg.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise BadRequest(f"messages[{i}].tool_call_id must be a string", f"messages[{i}].tool_call_id")
        return {"role": "tool", "content": content}
    calls = msg.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise BadRequest(f"messages[{i}].tool_calls must be a non-empty list", f"messages[{i}].tool_calls")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        args = fn.get("arguments") if isinstance(fn, dict) else None
        if not (isinstance(name, str) and NAME.match(name) and isinstance(args, str)):
            raise BadRequest(f"messages[{i}].tool_calls[{j}] must be {{'function': {{'name', 'arguments': a JSON string}}}}",
                             f"messages[{i}].tool_calls[{j}]")
        out.append({"name": name, "arguments": args})
    return {"role": "assistant", "content": content, "tool_calls": out}


def uses_tools(messages: list[dict], tools: Tools | None) -> bool:
    return tools is not None or any(m["role"] == "tool" or "tool_calls" in m for m in messages)


def tools_prompt(tools: Tools) -> str:
    lines = ["## Tools", "You have access to the following tools:", ""]
    for f in tools.functions:
        lines += [f"### {f['name']}", f"Description: {f['description']}", "",
                  f"Parameters: {json.dumps(f['parameters'], ensure_ascii=False)}", ""]
    lines.append(f"To call tools, answer with {CALLS_BEGIN}{CALL_BEGIN}function{SEP}NAME\n```json\nARGUMENTS\n```{CALL_END}{CALLS_END}")
    return "\n".join(lines)


def render(messages: list[dict], tools: Tools | None, bos: str = "") -> str:
    """The prompt text in DeepSeek-R1's chat format, tool calls and results included."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    if tools is not None and tools.choice != "none":
        system = (system + "\n\n" if system else "") + tools_prompt(tools)
    out, in_outputs = [bos, system], False
    for m in messages:
        role = m["role"]
        if role == "tool":
            out.append(("" if in_outputs else OUTPUTS_BEGIN) + OUTPUT_BEGIN + m["content"] + OUTPUT_END)
            in_outputs = True
            continue
        after_outputs, in_outputs = in_outputs, False
        if after_outputs:
            out.append(OUTPUTS_END)
        if role == "user":
            out.append(USER + m["content"])
        elif role == "assistant":
            content = m["content"].split(THINK_CLOSE)[-1]
            if "tool_calls" in m:
                calls = "\n".join(f"{CALL_BEGIN}function{SEP}{c['name']}\n```json\n{c['arguments']}\n```{CALL_END}" for c in m["tool_calls"])
                out.append(ASSISTANT + content + CALLS_BEGIN + calls + CALLS_END + EOS)
            else:  # the answer to tool outputs follows them directly
                out.append(("" if after_outputs else ASSISTANT) + content + EOS)
    out.append(OUTPUTS_END if in_outputs else ASSISTANT + THINK_OPEN + "\n")
    return "".join(out)


def constraint(tools: Tools, token_id) -> Constraint:
    """A Lark grammar for the tool-call block: one call of the named function, or one or more of any.
    token_id(text) -> id where the tokenizer has the marker as one token (written <[id]>), else None."""

    def lit(s: str) -> str:
        tid = token_id(s)
        return f"<[{tid}]>" if tid is not None else json.dumps(s, ensure_ascii=False)

    fns = [f for f in tools.functions if tools.choice in ("required", f["name"])]
    rules = [f'start: {lit(CALLS_BEGIN)} call {"" if tools.choice != "required" else "(" + json.dumps(chr(10)) + " call)* "}{lit(CALLS_END)}',
             f'call: {lit(CALL_BEGIN)} "function" {lit(SEP)} ({" | ".join(f"fn{i}" for i in range(len(fns)))})']
    for i, f in enumerate(fns):
        rules.append(f'fn{i}: {json.dumps(f["name"] + chr(10) + "```json" + chr(10))} args{i} {json.dumps(chr(10) + "```")} {lit(CALL_END)}')
        rules.append(f"args{i}: %json {json.dumps(f['parameters'], ensure_ascii=False)}")
    return Constraint("lark", "\n".join(rules) + "\n")


def parse_output(text: str) -> tuple[str, list[dict]]:
    """(content, tool calls in OpenAI's shape) from generated text written with its special tokens."""
    head, sep, tail = text.partition(CALLS_BEGIN)
    content = head.removesuffix(EOS)
    calls = []
    for kind, name, args in _CALL.findall(tail) if sep else ():
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": name, "arguments": args}})
    return (content if not calls else head.strip()), calls


_HEAD = re.compile(r"\s*" + re.escape(CALL_BEGIN) + r"(\w+)" + re.escape(SEP) + r"([A-Za-z0-9_-]+)\n```json\n")
_ARGS_END = "\n```" + CALL_END


def _held(text: str, *markers: str) -> int:
    """How many trailing characters to keep back: an unfinished UTF-8 character, or what may begin a marker."""
    n = len(text) - len(text.rstrip("\ufffd"))
    body = text[:len(text) - n]
    return n + max((k for m in markers for k in range(1, len(m)) if body.endswith(m[:k])), default=0)


class CallStream:
    """Streamed tool calls: fed the completion's raw text (special tokens written) each time it grows,
    returns OpenAI chat deltas in order: `content` before the call block, then per call one delta with
    index, id, type and the name (arguments ""), then `arguments` fragments as they are written."""

    def __init__(self):
        self.calls = 0  # calls whose block closed
        self._start: int | None = None  # tokens up to the one that completes CALLS_BEGIN
        self._sent = 0  # characters of content, or of the call block, already turned into deltas
        self._in_block = False
        self._state = "between"  # in the block: "between" calls, "args" of call number self._index
        self._index = -1

    def feed_ids(self, ids: list[int], raw, visible, final: bool = False) -> list[dict]:
        """ids: the completion so far; raw(ids) its text with special tokens written, visible(ids) without
        them (content is sent as visible text, as without tools)."""
        text = raw(ids)
        if self._start is None and CALLS_BEGIN in text:
            lo, hi = 1, len(ids)  # the shortest prefix whose text holds the marker
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if CALLS_BEGIN in raw(ids[:mid]) else (mid + 1, hi)
            self._start = lo
        return self.feed(text, final, visible(ids if self._start is None else ids[:self._start]))

    def feed(self, raw: str, final: bool = False, visible: str | None = None) -> list[dict]:
        head, sep, block = raw.partition(CALLS_BEGIN)
        out = []
        if not self._in_block:
            content = (head if visible is None else visible.partition(CALLS_BEGIN)[0]).partition(EOS)[0]
            end = len(content) if sep or final or EOS in head else len(content) - _held(content, CALLS_BEGIN, EOS)
            if end > self._sent:
                out.append({"content": content[self._sent:end]})
                self._sent = end
            if not sep:
                return out
            self._in_block, self._sent = True, 0
        return out + self._block(block, final)

    def _block(self, block: str, final: bool) -> list[dict]:
        out = []
        while True:
            rest = block[self._sent:]
            if self._state == "between":
                m = _HEAD.match(rest)
                if m is None:
                    return out
                self._index += 1
                self._state, self._sent = "args", self._sent + m.end()
                out.append({"tool_calls": [{"index": self._index, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                                            "function": {"name": m.group(2), "arguments": ""}}]})
                continue
            end = rest.find(_ARGS_END)
            take = end if end >= 0 else len(rest) if final else len(rest) - _held(rest, _ARGS_END)
            if take > 0:
                out.append({"tool_calls": [{"index": self._index, "function": {"arguments": rest[:take]}}]})
                self._sent += take
            if end < 0:
                return out
            self._sent += len(_ARGS_END)
            self._state, self.calls = "between", self.calls + 1
