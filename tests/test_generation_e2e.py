"""Converted tiny Qwen2 / Llama bundles: the runtime's greedy tokens equal PyTorch's greedy tokens
on the same dequantized int4 weights (the bundle's weights are read back, dequantized with numpy
and loaded into the Hugging Face model), for prompt lengths 1 and > 1 and batches 1 and 2."""

import numpy as np
from pathlib import Path
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

import edge_sdk  # noqa: E402

ARCHS = ["qwen2", "llama"]
PROMPTS = [[7], [5, 17, 42, 7, 99, 3, 64]]
NEW = 8


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    """(runtime model, PyTorch model with the bundle's dequantized weights) for one architecture."""
    try:
        make_bundle, make_model_dir = request.getfixturevalue("tiny_bundle"), request.getfixturevalue("tiny_model_dir")
    except pytest.FixtureLookupError:
        pytest.skip("the tiny_bundle / tiny_model_dir fixtures (tests/conftest.py) are not available")
    bundle, hf_dir = make_bundle(request.param), make_model_dir(request.param)
    model = edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1)
    return model, reference_model(hf_dir, bundle)


def dequantized_initializers(graph_path) -> dict[str, np.ndarray]:
    """{initializer name: float32 array}; DequantizeLinear outputs stored under their weight's name."""
    m = onnx.load(str(graph_path), load_external_data=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {k: v.astype(np.float32) for k, v in inits.items() if v.dtype.kind == "f"}
    for node in m.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = inits[node.input[0]].astype(np.float32)
        scale = _through_casts(m, node.input[1], inits).astype(np.float32)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
        zp = inits[node.input[2]].astype(np.float32) if len(node.input) > 2 and node.input[2] else 0.0
        if block:
            scale = np.repeat(scale, block, axis=axis)[tuple(slice(0, n) for n in q.shape)]
            zp = np.repeat(zp, block, axis=axis)[tuple(slice(0, n) for n in q.shape)] if np.ndim(zp) else zp
        out[node.input[0]] = (q - zp) * scale
    return out


def _through_casts(m, name, inits):
    if name in inits:
        return inits[name]
    for node in m.graph.node:
        if node.output and node.output[0] == name and node.op_type == "Cast":
            return _through_casts(m, node.input[0], inits)
    raise KeyError(name)


def reference_model(hf_dir, bundle):
    import json

    import torch
    from transformers import AutoModelForCausalLM

    manifest = json.loads((bundle / "manifest.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    weights = dequantized_initializers(bundle / manifest["graphs"]["fp32"]["file"])
    state = hf.state_dict()
    loaded = set()
    for name, w in weights.items():
        quantized = name.endswith(".qweight")
        key = name[: -len(".qweight")] + ".weight" if quantized else name
        if key not in state:
            continue
        t = torch.from_numpy(np.ascontiguousarray(w))
        if quantized:
            t = t.T  # int4 weights are stored [in, out] for MatMul; torch Linear holds [out, in]
        assert t.shape == state[key].shape, (name, t.shape, state[key].shape)
        state[key].copy_(t)
        loaded.add(key)
    quantized = {k for k in state if k.endswith("proj.weight")}
    assert quantized <= loaded, f"no int4 weights found in the bundle for {sorted(quantized - loaded)[:3]}"
    if hf.config.tie_word_embeddings:
        hf.tie_weights()
    return hf


def torch_greedy(hf, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def runtime_greedy(model, prompts, n, prefill_chunk=512):
    from edge_sdk.runtime.generate.generation import GenerationConfig, Generator

    gen = Generator(model.backend, model.tokenizer, max_seq_len=64, prefill_chunk=prefill_chunk)
    tokens = [[] for _ in prompts]
    for c in gen.stream(prompts, GenerationConfig(max_new_tokens=n, ignore_eos=True)):
        tokens[c.index].append(c.token_id)
    return tokens


@pytest.mark.parametrize("prompt", PROMPTS, ids=["len1", "len7"])
def test_greedy_batch1_equals_torch(pair, prompt):
    model, hf = pair
    assert runtime_greedy(model, [prompt], NEW)[0] == torch_greedy(hf, prompt, NEW)


@pytest.mark.parametrize("chunk", [512, 3], ids=["whole-prefill", "chunked-prefill"])
def test_greedy_batch2_left_padded_equals_torch(pair, chunk):
    model, hf = pair
    got = runtime_greedy(model, PROMPTS, NEW, prefill_chunk=chunk)
    assert got == [torch_greedy(hf, p, NEW) for p in PROMPTS]


def test_prefill_logits_close_to_torch(pair):
    import torch

    model, hf = pair
    prompt = PROMPTS[1]
    cache = model.backend.new_cache(1, 16)
    logits = model.backend.forward(np.array([prompt]), cache)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits.numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-3, atol=1e-3)


def test_streaming_equals_non_streaming_on_real_tokenizer(pair):
    model, _ = pair
    c = model.generate("Hello world", max_new_tokens=10, ignore_eos=True)
    assert "".join(x.text for x in model.generate("Hello world", max_new_tokens=10, ignore_eos=True, stream=True)) == c.text
    assert c.text == model.tokenizer.decode(c.token_ids)


@pytest.mark.parametrize("level", [1, 4])
def test_int4_matmuls_fused_to_matmulnbits(pair, tmp_path, level):
    """onnxruntime turns every DequantizeLinear -> MatMul pair of the bundle's graph into MatMulNBits at the
    chosen accuracy level (the standard graph, as the CUDA and TensorRT providers get it)."""
    from edge_sdk.runtime.backends.ort import OrtBackend

    model, _ = pair
    graph = Path(model.bundle) / model.manifest["graphs"]["fp32"]["file"]
    opt = tmp_path / "optimized.onnx"
    OrtBackend(graph, model.backend.io, providers=["CPUExecutionProvider"], threads=1,
               accuracy_level=level, optimized_model_path=opt)
    src = onnx.load(str(graph), load_external_data=False)
    fused = onnx.load(str(opt), load_external_data=False)
    n_dq = sum(n.op_type == "DequantizeLinear" for n in src.graph.node)
    nbits = [n for n in fused.graph.node if n.op_type == "MatMulNBits"]
    assert n_dq > 0 and len(nbits) == n_dq
    assert not any(n.op_type == "DequantizeLinear" for n in fused.graph.node)
    assert all(onnx.helper.get_attribute_value(a) == level for n in nbits for a in n.attribute if a.name == "accuracy_level")


def test_bytes_read_per_token_matches_planner(pair):
    """What bench counts from the bundle's weights table equals the planner's figure for the same config."""
    from edge_sdk.runtime.generate.bench import _planned_read_per_token, weight_bytes_per_token

    model, _ = pair
    assert weight_bytes_per_token(model.manifest) == _planned_read_per_token(model.manifest["source"]["config"]) > 0


def test_cli_bench_on_emulated_board_adds_planner_roofline(pair, capsys):
    import json

    from edge_sdk.cli.main import main
    from edge_sdk.planner import plan

    model, _ = pair
    assert main(["bench", str(model.bundle), "--provider", "cpu", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--repeats", "1", "--emulate", "orin-nx-16gb", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    p = plan(model.manifest["source"]["config"], "orin-nx-16gb", context=12)
    assert r["board_roofline"]["modes"] == {m.mode: round(m.decode_bound_tokens_per_s, 1) for m in p.modes}
    assert r["bytes_read_per_token"] == r["weight_bytes_per_step"] + r["kv_bytes_per_step"]


def _require_provider(name):
    import onnxruntime

    if name not in onnxruntime.get_available_providers():
        pytest.skip(f"onnxruntime here offers no {name} (has {', '.join(onnxruntime.get_available_providers())})")


@pytest.mark.gpu
def test_cuda_provider_logits_match_cpu(pair):
    _require_provider("CUDAExecutionProvider")
    model, _ = pair
    gpu = edge_sdk.load(model.bundle, provider="cuda", accuracy_level=1)
    prompt = np.array([PROMPTS[1]])
    cpu_logits = model.backend.forward(prompt, model.backend.new_cache(1, 16))
    gpu_logits = gpu.backend.forward(prompt, gpu.backend.new_cache(1, 16))
    tol = 2e-2 if gpu.backend.graph_path.name != model.backend.graph_path.name else 1e-3  # fp16 graph on the GPU
    np.testing.assert_allclose(gpu_logits, cpu_logits, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_native_tensorrt_greedy_matches_cpu(pair, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    import json

    from edge_sdk.runtime.backends.tensorrt.build import EngineBuildSettings, build_engine

    model, _ = pair
    manifest = json.loads((model.bundle / "manifest.json").read_text())
    build_engine(model.bundle, manifest, "local", trt, cache_root=tmp_path, report=lambda m: None,
                 settings=EngineBuildSettings(max_seq_len=64, max_prompt=32, opt_prompt=8, opt_past=16))
    gpu = edge_sdk.load(model.bundle, provider="tensorrt", engine_cache_dir=str(tmp_path), max_seq_len=64)
    assert runtime_greedy(gpu, [PROMPTS[1]], NEW) == runtime_greedy(model, [PROMPTS[1]], NEW)


def test_kv_budget_from_board_memory_plan(pair):
    from edge_sdk.planner import plan

    model, _ = pair
    on_board = edge_sdk.load(model.bundle, provider="cpu", emulate="orin-nano-8gb", max_seq_len=64)
    p = plan(model.manifest["source"]["config"], "orin-nano-8gb", context=64)
    assert on_board.generator.kv_budget_bytes == p.usable_bytes - p.weight_bytes["total"] - p.workspace_bytes - p.runtime_overhead_bytes
    assert model.generator.kv_budget_bytes is None  # no board: only max_seq_len limits the cache


def test_bundle_chat_template_renders_deepseek_r1_format(pair):
    from edge_sdk.chat import render_r1

    model, _ = pair
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>greet</think>Hello"}, {"role": "user", "content": "2+2?"}]
    assert model.tokenizer.chat_template
    rendered = model.tokenizer.decode(model.encode_chat(msgs), skip_special_tokens=False)
    assert rendered == render_r1(msgs, bos_token=model.tokenizer.bos_token)
    assert rendered.endswith("<｜Assistant｜><think>\n") and "greet" not in rendered
