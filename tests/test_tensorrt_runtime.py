"""The native TensorRT backend end to end against the contract fake (tests/trt_fake.py): profiles,
chunked prefill, engine limits, set_input_shape checks, device KV select/merge, and greedy tokens
equal to the CPU backend's. The fake computes through onnxruntime on the CPU."""

import json

import numpy as np
import pytest

from edge_sdk.errors import ConfigError, MemoryBudgetError, RuntimeBackendError
from edge_sdk.runtime.backends.kv_cache import KVCache, ModelIO
from edge_sdk.runtime.backends.tensorrt import build as tb
from edge_sdk.runtime.backends.tensorrt.backend import TensorRTBackend

import trt_fake

pytest.importorskip("onnxruntime")
SETTINGS = tb.EngineBuildSettings(max_batch=2, max_prompt=512, max_seq_len=1600, opt_prompt=128, opt_past=512, graph="fp32")


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle("qwen2")


@pytest.fixture()
def fakes(monkeypatch):
    return trt_fake.install(monkeypatch)


def manifest_of(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def engine(bundle, trt, tmp_path, settings=SETTINGS):
    path, _ = tb.build_engine(bundle, manifest_of(bundle), "local", trt, settings=settings, cache_root=tmp_path / "engines",
                              report=lambda m: None)
    return path


@pytest.fixture()
def backends(bundle, fakes, tmp_path):
    from edge_sdk.runtime.backends.ort import OrtBackend

    trt, _ = fakes
    io = ModelIO.from_manifest(manifest_of(bundle))
    cpu = OrtBackend(bundle / manifest_of(bundle)["graphs"]["fp32"]["file"], io, providers=["CPUExecutionProvider"], threads=1)
    return TensorRTBackend(engine(bundle, trt, tmp_path), io, trt), cpu


def greedy(backend, prompts: list[list[int]], new: int = 4, chunk: int = 512) -> list[list[int]]:
    """Left-padded batch; the prompt in chunks of `chunk` (as Generator.prefill), then `new` greedy steps."""
    longest = max(map(len, prompts))
    ids = np.full((len(prompts), longest), 2, np.int64)
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):], mask[r, longest - len(p):] = p, 1
    cache = backend.new_cache(len(prompts), longest + new)
    for s in range(0, longest, chunk):
        logits = backend.forward(ids[:, s:s + chunk], cache, mask[:, s:s + chunk])[:, -1]
    out = [[] for _ in prompts]
    for _ in range(new):
        tok = logits.argmax(-1)
        for r, t in enumerate(tok):
            out[r].append(int(t))
        logits = backend.forward(tok[:, None].astype(np.int64), cache)[:, -1]
    return out


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 1000, n).tolist()


@pytest.mark.parametrize("lengths", [[1], [511], [513], [1500], [511, 1500], [1, 513]])
def test_greedy_tokens_equal_the_cpu_backend(backends, lengths):
    trt_backend, cpu = backends
    prompts = [prompt(n, seed=i) for i, n in enumerate(lengths)]
    assert greedy(trt_backend, prompts) == greedy(cpu, prompts)


def test_each_step_runs_on_its_profile(backends):
    trt_backend, _ = backends
    greedy(trt_backend, [prompt(1500)], new=2)
    names = [tb.PROFILE_NAMES[p] for p in trt_backend.context.executions]
    assert names == ["prefill", "chunk", "chunk", "decode", "decode"]
    assert not trt_backend.context.errors


def test_a_chunk_longer_than_the_engine_takes_runs_in_pieces(backends):
    trt_backend, cpu = backends
    p = [prompt(700)]
    assert greedy(trt_backend, p, chunk=700) == greedy(cpu, p, chunk=700)
    assert [tb.PROFILE_NAMES[x] for x in trt_backend.context.executions[:2]] == ["prefill", "chunk"]


def test_logits_match_the_cpu_backend(backends):
    trt_backend, cpu = backends
    ids = np.asarray([prompt(600)])
    a, b = trt_backend.new_cache(1, 700), cpu.new_cache(1, 700)
    la = np.concatenate([trt_backend.forward(ids[:, s:s + 512], a) for s in (0, 512)], axis=1)
    lb = np.concatenate([cpu.forward(ids[:, s:s + 512], b) for s in (0, 512)], axis=1)
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.host_past(1, 0), b.host_past(1, 0), rtol=1e-4, atol=1e-5)


def test_the_old_two_profile_engine_fails_in_one_line(bundle, fakes, tmp_path, monkeypatch):
    """Regression: prefill (past 0) and decode (seq 1) profiles only; a second prompt chunk fits neither."""
    trt, _ = fakes
    full = tb.profiles
    monkeypatch.setattr(tb, "profiles", lambda s, io: [full(s, io)[0], full(s, io)[2]])
    backend = TensorRTBackend(engine(bundle, trt, tmp_path), ModelIO.from_manifest(manifest_of(bundle)), trt)
    with pytest.raises(RuntimeBackendError, match=r"no profile of the TensorRT engine admits this step: input_ids \(1, 88\)") as e:
        backend.forward(np.asarray([prompt(600)]), backend.new_cache(1, 600))
    assert "\n" not in str(e.value)


def test_set_input_shape_false_names_tensor_shape_and_range(backends):
    trt_backend, _ = backends
    # the runtime's view of the profiles is wider than the engine's: the engine refuses, and says so
    trt_backend.profiles = [{n: (lo, opt, tuple(x * 4 for x in hi)) for n, (lo, opt, hi) in p.items()} for p in trt_backend.profiles]
    with pytest.raises(RuntimeBackendError, match=r"TensorRT refused input_ids shape \(1, 600\): profile 0 admits \(1, 1\)\.\.\(8, 2048\)"):
        trt_backend._step(np.ones((1, 600), np.int64), trt_backend.new_cache(1, 600), np.ones((1, 600), np.int64))


def test_engine_limits_cap_batch_and_context(backends):
    trt_backend, _ = backends
    assert trt_backend.limits == {"max_batch": 2, "max_prompt": 512, "max_seq_len": 1600}
    assert trt_backend.io.max_positions == 1600  # the Generator's default context follows the engine
    with pytest.raises(ConfigError, match="batch 3 exceeds the TensorRT engine's max_batch 2"):
        trt_backend.new_cache(3, 10)
    with pytest.raises(MemoryBudgetError, match="1601 tokens of context exceed the TensorRT engine's max_seq_len 1600"):
        trt_backend.new_cache(1, 1601)


@pytest.mark.parametrize("bad", ["", "{}", '{"limits": {"max_batch": 0, "max_prompt": 1, "max_seq_len": 1}}',
                                 '{"limits": {"max_batch": "2", "max_prompt": 1, "max_seq_len": 1}}', "[1]"])
def test_bad_engine_json_is_one_line(bundle, fakes, tmp_path, bad):
    trt, _ = fakes
    path = engine(bundle, trt, tmp_path)
    (path.parent / "engine.json").write_text(bad)
    with pytest.raises(RuntimeBackendError, match="no valid engine limits") as e:
        TensorRTBackend(path, ModelIO.from_manifest(manifest_of(bundle)), trt)
    assert "\n" not in str(e.value)


def test_select_and_stack_gather_on_the_device(backends):
    """The daemon's rebuild (KVCache.stack) and select run device-to-device and decode as the CPU does."""
    trt_backend, cpu = backends
    a_ids, b_ids = np.asarray([prompt(9, 1)]), np.asarray([prompt(5, 2)])

    def run(backend):
        a, b = backend.new_cache(1, 20), backend.new_cache(1, 20)
        la, lb = backend.forward(a_ids, a)[:, -1], backend.forward(b_ids, b)[:, -1]
        batch = KVCache.stack([(a, 0), (b, 0)], 20)
        toks = np.asarray([[la.argmax()], [lb.argmax()]], np.int64)
        out = [toks[:, 0].tolist()]
        for _ in range(3):
            toks = backend.forward(toks, batch)[:, -1].argmax(-1)[:, None]
            out.append(toks[:, 0].tolist())
        one = batch.select([1])
        out.append(backend.forward(toks[1:], one)[:, -1].argmax(-1).tolist())
        return out, batch, one

    (t_out, t_batch, t_one), (c_out, c_batch, c_one) = run(trt_backend), run(cpu)
    assert t_out == c_out
    assert t_batch.mask.tolist() == c_batch.mask.tolist() and t_one.mask.tolist() == c_one.mask.tolist()
    np.testing.assert_allclose(t_one.host_past(0, 1), c_one.host_past(0, 1), rtol=1e-4, atol=1e-5)
    calls = trt_fake.CUDART.calls
    assert "cudaMemcpy2DAsync" in calls and "cudaMemcpyAsync:cudaMemcpyDeviceToHost" in calls


def test_merge_refuses_host_and_device_caches_together(backends):
    trt_backend, cpu = backends
    with pytest.raises(ConfigError, match="device and host"):
        KVCache.stack([(trt_backend.new_cache(1, 4), 0), (cpu.new_cache(1, 4), 0)], 4)


# --- the fake itself enforces the contract --------------------------------------------------------


def test_fake_refuses_execute_without_shapes_or_addresses(backends):
    trt_backend, _ = backends
    ctx = trt_backend.engine.create_execution_context()
    assert ctx.execute_async_v3(0) is False and "input shapes not set" in ctx.errors[-1]
    for name in trt_backend.inputs:
        lo = trt_backend.profiles[0][name][0]
        assert ctx.set_input_shape(name, lo)
    assert ctx.execute_async_v3(0) is False and "addresses not set" in ctx.errors[-1]
    assert ctx.set_input_shape("input_ids", (1, 10**6)) is False
    assert ctx.set_optimization_profile_async(1, 0) and not ctx.shapes  # a switch drops the shapes


def test_fake_copies_follow_stream_order_and_memory_spaces(fakes):
    _, cudart = fakes
    _, stream = cudart.cudaStreamCreate()
    _, dev = cudart.cudaMalloc(16)
    host = np.arange(4, dtype=np.float32)
    back = np.zeros(4, np.float32)
    assert cudart.cudaMemcpyAsync(dev, host.ctypes.data, 16, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)[0] == 0
    assert cudart.cudaMemcpyAsync(back.ctypes.data, dev, 16, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)[0] == 0
    assert back.tolist() == [0, 0, 0, 0]  # nothing lands before the stream runs
    cudart.cudaStreamSynchronize(stream)
    assert back.tolist() == [0, 1, 2, 3]
    # a host pointer where a device one belongs, a copy past the allocation: refused
    assert cudart.cudaMemcpyAsync(host.ctypes.data, back.ctypes.data, 16, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)[0] != 0
    assert cudart.cudaMemcpyAsync(dev, host.ctypes.data, 32, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)[0] != 0
    _, fresh = cudart.cudaMalloc(8)
    assert np.isnan(cudart.device_view(fresh, 8).view(np.float32)).all()  # cudaMalloc does not zero

