"""Backend + KV cache mechanics on a small hand-built graph with the bundle's I/O contract.

The graph's logits depend on every cached key/value (masked) and on the positions, so any slip in
buffer swapping, masks, left padding, positions, select or merge changes them; the reference is
the same arithmetic in numpy over the whole sequence.
"""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_sdk.errors import MemoryBudgetError  # noqa: E402
from edge_sdk.runtime.backends.kv_cache import KVCache, ModelIO  # noqa: E402
from edge_sdk.runtime.backends.ort import OrtBackend, OrtValueKVCache  # noqa: E402

L, H, D, V, MAXPOS = 2, 2, 4, 16, 64
IO = ModelIO(L, H, D, V, MAXPOS)


class Toy:
    """Tables of the toy decoder; `vin` input ids map to V output logits."""

    def __init__(self, vin: int = V, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.ek = [rng.standard_normal((vin, H * D)).astype(np.float32) for _ in range(L)]
        self.ev = [rng.standard_normal((MAXPOS, H * D)).astype(np.float32) for _ in range(L)]
        self.w = rng.standard_normal((D, V)).astype(np.float32)
        self.eout = rng.standard_normal((vin, V)).astype(np.float32)

    def build(self, path):
        f = TensorProto.FLOAT
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["B", "S"])]
        outputs = [helper.make_tensor_value_info("logits", f, ["B", "S", V])]
        inits = [numpy_helper.from_array(self.w, "W"), numpy_helper.from_array(self.eout, "Eout"),
                 numpy_helper.from_array(np.array([0, 0, H, D], np.int64), "shape4"),
                 numpy_helper.from_array(np.array([1, 3], np.int64), "ax13"),
                 numpy_helper.from_array(np.array([1, 2], np.int64), "ax12"),
                 numpy_helper.from_array(np.array([1], np.int64), "ax1")]
        nodes = [helper.make_node("Cast", ["attention_mask"], ["maskf"], to=f),
                 helper.make_node("Unsqueeze", ["maskf", "ax13"], ["mask4"])]
        sums = []
        for i in range(L):
            inits += [numpy_helper.from_array(self.ek[i], f"Ek{i}"), numpy_helper.from_array(self.ev[i], f"Ev{i}")]
            for kind, table, idx in (("key", f"Ek{i}", "input_ids"), ("value", f"Ev{i}", "position_ids")):
                past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
                inputs.append(helper.make_tensor_value_info(past, f, ["B", H, "P", D]))
                outputs.append(helper.make_tensor_value_info(present, f, ["B", H, "T", D]))
                nodes += [helper.make_node("Gather", [table, idx], [f"g{i}{kind}"]),
                          helper.make_node("Reshape", [f"g{i}{kind}", "shape4"], [f"r{i}{kind}"]),
                          helper.make_node("Transpose", [f"r{i}{kind}"], [f"t{i}{kind}"], perm=[0, 2, 1, 3]),
                          helper.make_node("Concat", [past, f"t{i}{kind}"], [present], axis=2),
                          helper.make_node("Mul", [present, "mask4"], [f"m{i}{kind}"]),
                          helper.make_node("ReduceSum", [f"m{i}{kind}", "ax12"], [f"s{i}{kind}"], keepdims=0)]
                sums.append(f"s{i}{kind}")
        nodes.append(helper.make_node("Sum", sums, ["total"]))
        nodes += [helper.make_node("MatMul", ["total", "W"], ["ctx"]),
                  helper.make_node("Unsqueeze", ["ctx", "ax1"], ["ctx3"]),
                  helper.make_node("Gather", ["Eout", "input_ids"], ["own"]),
                  helper.make_node("Add", ["ctx3", "own"], ["logits"])]
        model = helper.make_model(helper.make_graph(nodes, "toy", inputs, outputs, inits),
                                  opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        onnx.save(model, str(path))

    def last_logits(self, tokens: list[int]) -> np.ndarray:
        """Logits of the last token of one sequence given all its real tokens (positions 0..n-1)."""
        total = np.zeros(D, np.float64)
        for i in range(L):
            for pos, tok in enumerate(tokens):
                total += self.ek[i][tok].reshape(H, D).sum(0) + self.ev[i][pos].reshape(H, D).sum(0)
        return total @ self.w + self.eout[tokens[-1]]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        seq = list(prompt)
        for _ in range(n):
            seq.append(int(np.argmax(self.last_logits(seq))))
        return seq[len(prompt):]


TOY = Toy()
reference_last_logits = TOY.last_logits


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "model.onnx"
    TOY.build(path)
    return OrtBackend(path, IO, providers=["CPUExecutionProvider"], threads=1, accuracy_level=1)


@pytest.fixture(params=["numpy", "ortvalue"])
def new_cache(request, backend):
    """Host numpy buffers (CPU provider) or OrtValue buffers (what the CUDA/TensorRT EPs get, here on the CPU)."""
    if request.param == "numpy":
        return backend.new_cache
    return lambda batch, capacity: OrtValueKVCache(backend.io, batch, capacity, device="cpu")


def run_steps(backend, seqs, new_cache, capacity=32):
    """Left-padded prefill of seqs[:, :-k] then one-token decode steps; returns last logits per step."""
    cache = new_cache(len(seqs), capacity)
    prompt_len = [len(s) - 3 for s in seqs]
    longest = max(prompt_len)
    ids = np.zeros((len(seqs), longest), np.int64)
    mask = np.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, longest - prompt_len[r]:] = s[:prompt_len[r]]
        mask[r, longest - prompt_len[r]:] = 1
    out = [backend.forward(ids, cache, mask)[:, -1]]
    for step in range(3):
        feed = np.array([[s[prompt_len[r] + step]] for r, s in enumerate(seqs)], np.int64)
        out.append(backend.forward(feed, cache)[:, -1])
    return out, cache, prompt_len


@pytest.mark.parametrize("seqs", [[[3, 1, 4, 1, 5]], [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3, 5]], [[7, 7, 7, 7]]])
def test_prefill_and_decode_match_reference(backend, seqs, new_cache):
    out, cache, prompt_len = run_steps(backend, seqs, new_cache)
    for r, s in enumerate(seqs):
        for step, logits in enumerate(out):
            np.testing.assert_allclose(logits[r], reference_last_logits(s[:prompt_len[r] + step]), rtol=1e-4, atol=1e-4)
    assert cache.length == max(prompt_len) + 3
    assert list(cache.positions()) == [len(s) for s in seqs]


def test_buffers_are_fixed(backend):
    cache = backend.new_cache(1, 8)
    bufs = [id(b) for layer in cache.buffers for pair in layer for b in pair]
    backend.forward(np.array([[1, 2]]), cache)
    backend.forward(np.array([[3]]), cache)
    assert [id(b) for layer in cache.buffers for pair in layer for b in pair] == bufs
    assert cache.nbytes == 2 * 2 * L * H * 8 * D * 4


def test_capacity_exceeded_is_memory_budget_error(backend):
    cache = backend.new_cache(1, 4)
    backend.forward(np.array([[1, 2, 3]]), cache)
    with pytest.raises(MemoryBudgetError, match="KV cache holds 4"):
        backend.forward(np.array([[1, 2]]), cache)


def test_merge_and_select_continue_each_sequence(backend, new_cache):
    a, b = [2, 3, 4, 5, 6], [9, 8]
    ca, cb = new_cache(1, 16), new_cache(1, 16)
    backend.forward(np.array([a[:-1]]), ca)
    backend.forward(np.array([b[:-1]]), cb)
    merged = KVCache.merge([ca, cb])
    assert type(merged) is type(ca) and merged.length == 4 and merged.mask.tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]
    logits = backend.forward(np.array([[a[-1]], [b[-1]]]), merged)[:, -1]
    np.testing.assert_allclose(logits[0], reference_last_logits(a), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[1], reference_last_logits(b), rtol=1e-4, atol=1e-4)
    only_b = merged.select([1])
    assert only_b.length == 2 and only_b.mask.tolist() == [[1, 1]]
    logits = backend.forward(np.array([[7]]), only_b)[:, -1]
    np.testing.assert_allclose(logits[0], reference_last_logits(b + [7]), rtol=1e-4, atol=1e-4)
