"""DeepSeek chat formats (R1, V2): prompt rendering and splitting `<think>` reasoning from the answer.

The bundle carries the model's Jinja chat template; it is rendered in a sandbox when jinja2 is
installed. Without jinja2 the built-in renderers below produce the same text for DeepSeek-R1's and
DeepSeek-V2's templates (tests check both agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_sdk.errors import ConfigError

USER, ASSISTANT, EOS = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# DeepSeek-R1(-Distill) template without the tool-call branches.
DEEPSEEK_R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

# DeepSeek-V2-Chat / V2-Lite-Chat / Coder-V2-Instruct template (tokenizer_config.json): plain-text roles,
# messages in order (the system prompt as given), no reasoning block.
DEEPSEEK_V2_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"message {i} is not {{'role': one of {ROLES}, 'content': str}}: {m!r}")
    return list(messages)


def render_r1(messages: list[dict], *, bos_token: str = "", add_generation_prompt: bool = True) -> str:
    messages = check_messages(messages)
    system = next((m["content"] for m in reversed(messages) if m["role"] == "system"), "")
    out = [bos_token, system]
    for m in messages:
        if m["role"] == "user":
            out.append(USER + m["content"])
        elif m["role"] == "assistant":
            # earlier reasoning is not fed back: only the answer after </think>
            out.append(ASSISTANT + m["content"].split(THINK_CLOSE)[-1] + EOS)
    if add_generation_prompt:
        out.append(ASSISTANT + THINK_OPEN + "\n")
    return "".join(out)


def render_v2(messages: list[dict], *, bos_token: str = "", eos_token: str = EOS, add_generation_prompt: bool = True) -> str:
    messages = check_messages(messages)
    turn = {"user": ("User: ", "\n\n"), "assistant": ("Assistant: ", eos_token), "system": ("", "\n\n")}  # (before, after)
    out = [bos_token] + [turn[m["role"]][0] + m["content"] + turn[m["role"]][1] for m in messages]
    return "".join(out) + ("Assistant:" if add_generation_prompt else "")


def render_builtin(template: str | None, messages: list[dict], *, bos_token: str = "", eos_token: str = EOS,
                   add_generation_prompt: bool = True) -> str:
    """The built-in renderer for a template (no jinja2 needed): DeepSeek-V2's, else DeepSeek-R1's."""
    if template == DEEPSEEK_V2_TEMPLATE:
        return render_v2(messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt)
    return render_r1(messages, bos_token=bos_token, add_generation_prompt=add_generation_prompt)


def render_template(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = EOS,
                    add_generation_prompt: bool = True) -> str:
    """Render a bundle's Jinja chat template in a sandbox (without jinja2, the built-in renderer)."""
    messages = check_messages(messages)
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return render_builtin(template, messages, bos_token=bos_token, eos_token=eos_token,
                              add_generation_prompt=add_generation_prompt)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises many types; all mean the same to the user
        raise ConfigError(f"the bundle's chat template failed to render ({exc})",
                          hint="re-convert the model, or pass a prompt string instead of messages") from exc


@dataclass
class ThinkSplit:
    """Splits generated text into reasoning (inside <think>) and the answer, also when streamed.

    The R1 prompt ends with `<think>\\n`, so generation starts inside the reasoning block.
    """

    in_think: bool = True
    _held: str = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Return (reasoning, answer) parts of the newly streamed text."""
        buf = self._held + text
        self._held = ""
        reasoning = answer = ""
        while buf:
            tag = THINK_CLOSE if self.in_think else THINK_OPEN
            i = buf.find(tag)
            if i >= 0:
                part, buf = buf[:i], buf[i + len(tag):]
                if self.in_think:
                    reasoning += part
                else:
                    answer += part
                self.in_think = not self.in_think
                continue
            hold = next((n for n in range(min(len(tag) - 1, len(buf)), 0, -1) if buf.endswith(tag[:n])), 0)
            part, self._held = buf[: len(buf) - hold], buf[len(buf) - hold:]
            if self.in_think:
                reasoning += part
            else:
                answer += part
            break
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self.in_think else ("", held)


def split_think(text: str, starts_in_think: bool = True) -> tuple[str, str]:
    """(reasoning, answer) of a complete generation; leading newlines of each part are trimmed."""
    s = ThinkSplit(in_think=starts_in_think)
    r1, a1 = s.feed(text)
    r2, a2 = s.flush()
    return (r1 + r2).strip("\n"), (a1 + a2).lstrip("\n")
