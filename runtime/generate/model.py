"""`Model`: what `edge_sdk.load` returns: generate text from prompts or chat messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from edge_sdk.errors import ConfigError

from edge_sdk.chat import THINK_OPEN, ThinkSplit, check_messages, render_r1, render_template, split_think
from .generation import Chunk, GenerationConfig, Generator, Timings


def kv_budget(manifest: dict, options, context: int) -> int | None:
    """KV bytes allowed: the explicit option, else what the board's memory plan leaves after weights,
    workspace and runtime overhead; None (unlimited) without a board."""
    if options.kv_budget_bytes is not None:
        return options.kv_budget_bytes
    config = manifest.get("source", {}).get("config")
    if not options.target_board or not config:
        return None
    from edge_sdk.planner import plan

    p = plan(config, options.target_board, context=context, batch=options.max_batch)
    return max(0, p.usable_bytes - (p.total_bytes - p.kv_bytes))


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    reasoning: str | None = None  # chat: text inside <think> ... </think>
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per token: (log p, top alternatives)
    timings: Timings | None = field(default=None, repr=False)


@dataclass
class ChatChunk(Chunk):
    reasoning: bool = False  # True while the text is inside <think> ... </think>


class Model:
    def __init__(self, bundle: Path, manifest: dict, backend, tokenizer, options):
        self.bundle, self.manifest, self.backend, self.tokenizer, self.options = bundle, manifest, backend, tokenizer, options
        self.draft: "Model | None" = None
        cap = options.max_seq_len or min(4096, backend.io.max_positions)
        self.generator = Generator(backend, tokenizer, max_seq_len=cap, kv_budget_bytes=kv_budget(manifest, options, cap))

    def attach_draft(self, draft: "Model") -> None:
        """Speculate with `draft` (a smaller model with the same tokenizer); its weights are charged to
        this model's KV budget and its KV cache to each request."""
        from .speculative import check_draft, weight_bytes

        check_draft(self, draft)
        self.draft, self.generator.draft = draft, draft.backend
        if self.generator.kv_budget_bytes is not None:
            self.generator.kv_budget_bytes = max(0, self.generator.kv_budget_bytes - weight_bytes(draft))

    @property
    def name(self) -> str:
        return self.manifest.get("source", {}).get("name") or self.bundle.name

    @property
    def last_timings(self) -> Timings:
        return self.generator.timings

    def encode_chat(self, messages: list[dict]) -> list[int]:
        tmpl = self.tokenizer.chat_template
        bos = self.tokenizer.bos_token
        text = render_template(tmpl, messages, bos_token=bos) if tmpl else render_r1(messages, bos_token=bos)
        # the template already holds the BOS token
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode(self, prompt) -> tuple[list[list[int]], bool, bool]:
        """(token ids per row, batched?, chat?)"""
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt)], False, False
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return [self.encode_chat(check_messages(prompt))], False, True
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            return [self.tokenizer.encode(p) for p in prompt], True, False
        raise ConfigError("prompt must be a string, a list of strings, or a list of {'role', 'content'} messages")

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 stop=None, stream: bool = False, seed: int | None = None, repetition_penalty: float = 1.0,
                 ignore_eos: bool = False, response_format=None, json_schema=None, regex: str | None = None,
                 grammar: str | None = None, logprobs: int | None = None, speculative=None):
        """A Completion (a list for a list of prompts), or an iterator of Chunks with stream=True.

        response_format / json_schema / regex / grammar (Lark) constrain the output (one at a time);
        logprobs=N reports each token's log-probability and its N most likely alternatives.
        speculative: None (the draft when one is loaded), False, True, "prompt-lookup", or a dict /
        SpeculativeConfig (k, adaptive, k_max, prompt_lookup, ngram, ngram_min); same output as without."""
        from .constrain import constraint
        from .speculative import SpeculativeConfig

        spec = SpeculativeConfig.of(speculative, has_draft=self.draft is not None)

        cfg = GenerationConfig(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                               stop or (), None, ignore_eos,
                               constraint(response_format, json_schema=json_schema, regex=regex, grammar=grammar), logprobs)
        ids, batched, chat = self._encode(prompt)
        if spec is not None and len(ids) != 1:
            raise ConfigError(f"speculative decoding runs one prompt at a time, got {len(ids)}",
                              hint="generate the prompts one by one, or pass speculative=False")
        if chat:
            return self._chat_stream(ids, cfg, spec) if stream else self._chat_complete(ids, cfg, spec)
        if stream:
            return self.generator.stream(ids, cfg, spec)
        out = self._collect(ids, cfg, spec)
        return out if batched else out[0]

    def chat(self, messages: list[dict], **kwargs):
        """Chat with DeepSeek-R1's template; the reply's `reasoning` holds the <think> part."""
        return self.generate(check_messages(messages), **kwargs)

    def _collect(self, ids: list[list[int]], cfg: GenerationConfig, spec=None) -> list[Completion]:
        texts = [[] for _ in ids]
        tokens = [[] for _ in ids]
        reasons = ["length"] * len(ids)
        lps = [[] if cfg.logprobs is not None else None for _ in ids]
        for c in self.generator.stream(ids, cfg, spec):
            texts[c.index].append(c.text)
            if c.token_id is not None:  # None: a grammar dead end, no token
                tokens[c.index].append(c.token_id)
                if c.logprob is not None:
                    lps[c.index].append((c.logprob, c.top_logprobs))
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
        t = self.generator.timings
        return [Completion("".join(texts[r]), tokens[r], reasons[r], len(ids[r]), timings=t, logprobs=lps[r])
                for r in range(len(ids))]

    def _starts_in_think(self, ids: list[int]) -> bool:
        return self.tokenizer.decode(ids[-4:], skip_special_tokens=False).rstrip().endswith(THINK_OPEN)

    def _chat_complete(self, ids, cfg, spec=None) -> Completion:
        c = self._collect(ids, cfg, spec)[0]
        c.reasoning, c.text = split_think(c.text, self._starts_in_think(ids[0]))
        return c

    def _chat_stream(self, ids, cfg, spec=None) -> Iterator[ChatChunk]:
        split = ThinkSplit(in_think=self._starts_in_think(ids[0]))
        for c in self.generator.stream(ids, cfg, spec):
            reasoning, answer = split.feed(c.text)
            if c.finish_reason:
                r2, a2 = split.flush()
                reasoning, answer = reasoning + r2, answer + a2
            if reasoning:
                yield ChatChunk(c.index, c.token_id, reasoning, None if answer else c.finish_reason, reasoning=True)
            if answer or not reasoning:
                yield ChatChunk(c.index, c.token_id, answer, c.finish_reason)
