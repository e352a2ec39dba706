"""Storage paging: layer-streamed decoding equals the resident run, stays inside its budget, fails
clearly on a truncated weights file, and idle KV caches come back exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import edge_sdk.runtime as rt
from edge_sdk.errors import BundleError, ConfigError, MemoryBudgetError
from edge_sdk.runtime.paging.backend import PagedBackend, PagingOptions
from edge_sdk.runtime.paging.fused import FusedPagedBackend
from edge_sdk.paging_model import PAGE, page_round, parse_budget, plan_paging, plan_pipelined, spread
from edge_sdk.runtime.paging.select import weight_bytes

EXACT = dict(provider="cpu", accuracy_level=1, threads=1, log_provider=False)
# the two executors: the fused graph's (sessions prepacked per paged layer, the CPU default) and the
# bundle graph's (weights bound as graph inputs; what the CUDA / TensorRT providers get)
EXECUTORS = {"fused": FusedPagedBackend, "standard": PagedBackend}
LAYERS = 10


@pytest.fixture(scope="session")
def deep_bundle(tmp_path_factory):
    """Tiny Qwen2 / Llama models with 10 decoder layers (so that a quarter of the weights still
    holds lm_head and two layer buffers), converted once per session."""
    pytest.importorskip("torch")
    from edge_sdk.converters import convert
    from edge_sdk.converters.tiny import build_model_dir, build_tokenizer, default_calibration_text, tiny_config

    from conftest import TINY_CONVERT

    root = tmp_path_factory.mktemp("deep-bundles")
    cache = {}

    def make(arch: str = "qwen2"):
        if arch not in cache:
            tok = build_tokenizer([default_calibration_text()])
            cfg = tiny_config(arch, tok.get_vocab_size(), num_hidden_layers=LAYERS)
            model = build_model_dir(root / f"{arch}-model", arch, seed=1, config=cfg, tokenizer=tok)
            convert(model, root / arch, **TINY_CONVERT)
            cache[arch] = root / arch
        return cache[arch]

    return make


def greedy(model, prompt, n=12):
    return model.generate(prompt, max_new_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("graph", list(EXECUTORS))
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("budget", ["50%", "25%"])
def test_paged_greedy_tokens_equal_resident(deep_bundle, arch, budget, graph):
    bundle = deep_bundle(arch)
    resident = rt.load(bundle, graph=graph, **EXACT)
    paged = rt.load(bundle, memory_budget=budget, graph=graph, **EXACT)
    assert type(paged.backend) is EXECUTORS[graph]
    plan = paged.backend.plan
    assert plan.paged and plan.peak_bytes <= parse_budget(budget, weight_bytes(paged.manifest))
    prompts = ["The runtime streams layers", "int4"]
    want = [greedy(resident, p) for p in prompts]
    got = [greedy(paged, p) for p in prompts]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert paged.backend.reader.layers_read >= len(plan.paged) * 12
    # a left-padded batch of two prompts of different lengths
    assert [c.token_ids for c in paged.generate(prompts, max_new_tokens=6, ignore_eos=True)] == \
           [c.token_ids for c in resident.generate(prompts, max_new_tokens=6, ignore_eos=True)]
    paged.backend.close()


@pytest.mark.parametrize("budget,fuse,io", [("25%", True, "reader"), ("50%", False, "reader"), ("50%", True, "reader"),
                                            ("25%", True, "mmap")])
def test_paged_logits_match_resident_graph(deep_bundle, budget, fuse, io):
    bundle = deep_bundle("qwen2")
    ref = rt.load(bundle, **EXACT).backend
    m = rt.loader.open_bundle(bundle, rt.options.RuntimeOptions(**EXACT))
    paged = PagedBackend(bundle, m, bundle / "model.onnx", ref.io,
                         PagingOptions(parse_budget(budget, weight_bytes(m)), fuse_resident=fuse, io=io),
                         providers=["CPUExecutionProvider"], threads=1, accuracy_level=1)
    assert len(paged.fused) == (len(paged.plan.resident) if fuse else 0)
    assert len(paged.resident) == (0 if fuse else len(paged.plan.resident))
    ids = np.array([[5, 17, 300, 9, 44, 2, 8]], np.int64)
    c1, c2 = ref.new_cache(1, 16), paged.new_cache(1, 16)
    np.testing.assert_allclose(paged.forward(ids, c2), ref.forward(ids, c1), atol=1e-4)
    for t in (3, 99):
        np.testing.assert_allclose(paged.forward(np.array([[t]]), c2), ref.forward(np.array([[t]]), c1), atol=1e-4)
    paged.close()


def transient_peak(model) -> int:
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    greedy(model, "memory budget", n=10)
    return tracemalloc.get_traced_memory()[1] - base


def test_prefetch_stays_inside_the_budget(deep_bundle):
    bundle = deep_bundle("llama")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        model = rt.load(bundle, memory_budget="25%", graph="standard", **EXACT)
        be = model.backend
        # buffers this process allocated (lm_head and fused resident layers are onnxruntime's)
        held = sum(n for k, n in be.ledger.items.items() if k.startswith("slot")) + sum(b.nbytes for b in be.resident.values())
        loaded = tracemalloc.get_traced_memory()[0] - before
        assert be.plan.slots == 2 and not be.plan.resident
        # measured: our page-aligned buffers are what the ledger says (+ one page of alignment slack each)
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*paging/buffers.py")])
        snap = snap.filter_traces([tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])  # numpy data only
        traced = sum(s.size for s in snap.statistics("filename"))
        assert held <= traced <= held + PAGE * (be.plan.slots + len(be.plan.resident))
        assert loaded >= held
        peak = transient_peak(model)
        reference = transient_peak(rt.load(bundle, graph="standard", **EXACT))  # same generation, all weights resident
    finally:
        tracemalloc.stop()
    assert be.reader.layers_read >= 10 * LAYERS  # every layer was streamed on every token
    assert be.ledger.peak <= be.options.budget_bytes
    # streaming allocates no layer-sized buffer beyond its slots: the transient peak of generating
    # (KV cache, logits, activations) is the resident run's, give or take a fraction of one layer
    assert peak - reference < be.plan.slot_bytes // 4, (peak, reference)
    be.close()


def test_fused_prefetch_stays_inside_the_budget(deep_bundle):
    """The fused executor's prefetch, measured: its slot buffers are what the ledger charges (tracemalloc),
    and the sessions holding prepacked copies of paged layers never outnumber what the plan charges
    (each counted live from creation to release)."""
    import weakref

    bundle = deep_bundle("qwen2")
    tracemalloc.start()
    try:
        model = rt.load(bundle, memory_budget="50%", **EXACT)
        be = model.backend
        assert type(be) is FusedPagedBackend and be.plan.paged and be.plan.sessions >= 1
        slots = sum(n for k, n in be.ledger.items.items() if k.startswith("slot"))
        assert slots == be.plan.slots * be.plan.slot_bytes
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*paging/buffers.py")])
        snap = snap.filter_traces([tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
        traced = sum(x.size for x in snap.statistics("filename"))
        assert slots <= traced <= slots + PAGE * be.plan.slots
    finally:
        tracemalloc.stop()
    live, most = set(), [0]
    build = be._layer_session

    def counted(i, buf, base):
        sess = build(i, buf, base)
        key = id(sess)
        live.add(key)
        most[0] = max(most[0], len(live))
        weakref.finalize(sess, live.discard, key)
        return sess

    be._layer_session = counted
    read_before = be.reader.layers_read
    greedy(model, "memory budget", n=8)  # 8 forward passes: every paged layer read for each (the reader
    assert be.reader.layers_read - read_before >= 7 * len(be.plan.paged)  # had read ahead before `read_before`)
    assert 1 <= most[0] <= be.plan.sessions
    assert be.ledger.peak <= be.options.budget_bytes and be.plan.peak_bytes <= be.options.budget_bytes
    be.close()


def test_fused_pipeline_reuses_slots_only_when_sessions_own_their_weights(deep_bundle, monkeypatch):
    """Where a session would still read its slot after being built, slots wait for the session to be
    dropped; the tokens are the same either way."""
    from edge_sdk.runtime.paging import fused

    bundle = deep_bundle("llama")
    want = greedy(rt.load(bundle, **EXACT), "pipeline", n=6).token_ids
    fast = rt.load(bundle, memory_budget="50%", **EXACT)
    assert fast.backend.release_early  # onnxruntime's CPU MatMulNBits prepacks into its own memory
    monkeypatch.setattr(fused.FusedPagedBackend, "_prepack_owns_weights", lambda self, sess, slot, nbytes: (False, 1e-3))
    safe = rt.load(bundle, memory_budget="50%", **EXACT)
    assert not safe.backend.release_early and not safe.backend.reader.release_early
    assert greedy(fast, "pipeline", n=6).token_ids == want == greedy(safe, "pipeline", n=6).token_ids
    fast.backend.close()
    safe.backend.close()


@pytest.mark.parametrize("graph", list(EXECUTORS))
def test_truncated_weights_file_is_a_bundle_error(deep_bundle, tmp_path, graph):
    src = deep_bundle("qwen2")
    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    model = rt.load(bundle, memory_budget="25%", graph=graph, **EXACT)
    if graph == "fused":  # it streams layers from its sidecar in the engine cache; cut that one short
        weights = model.backend.file.path
    else:
        weights = bundle / "model.weights"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    with pytest.raises(BundleError, match="truncated"):  # while running: the reader hits the end of the file
        for _ in range(4):
            greedy(model, "cut short", n=4)
    with pytest.raises(BundleError, match="truncated"):  # every later step too, not a hang
        greedy(model, "again", n=1)
    model.backend.close()
    if graph == "fused":  # at load: the sidecar's size is checked and it is rebuilt from the bundle
        again = rt.load(bundle, memory_budget="25%", graph=graph, **EXACT)
        assert again.backend.file.size > size // 2
        os.truncate(bundle / "model.weights", (bundle / "model.weights").stat().st_size // 2)
    with pytest.raises(BundleError):  # at load: the hashes catch it first
        rt.load(bundle, memory_budget="25%", graph=graph, **EXACT)
    manifest = rt.loader.open_bundle(src, rt.options.RuntimeOptions(**EXACT))
    with pytest.raises(BundleError, match="truncated"):  # and the executor itself checks the size
        PagedBackend(bundle, manifest, bundle / "model.onnx", rt.backends.kv_cache.ModelIO.from_manifest(manifest),
                     PagingOptions(10 << 20), providers=["CPUExecutionProvider"], threads=1)


def test_paging_graphs_cached_beside_the_bundle_not_inside(deep_bundle):
    bundle = deep_bundle("llama")
    before = sorted(p.name for p in bundle.iterdir())
    be = rt.load(bundle, memory_budget="50%", graph="standard", **EXACT).backend
    be.close()
    be = rt.load(bundle, memory_budget="50%", **EXACT).backend
    be.close()
    assert sorted(p.name for p in bundle.iterdir()) == before
    assert list((bundle.parent / ".edge-sdk-engines").glob("ort-fused/*/fused.weights"))
    cached = list((bundle.parent / ".edge-sdk-paging").glob("*/layer.onnx"))
    assert cached
    rt.loader.open_bundle(bundle, rt.options.RuntimeOptions(**EXACT))  # hashes still verify


def test_fitting_budget_stays_resident(deep_bundle):
    bundle = deep_bundle("qwen2")
    model = rt.load(bundle, memory_budget="100%", **EXACT)
    assert not isinstance(model.backend, (PagedBackend, FusedPagedBackend))
    with pytest.raises(MemoryBudgetError, match="at least"):
        rt.load(bundle, memory_budget="5%", **EXACT)


# --- plan: which layers stay resident ---------------------------------------------------------

def test_plan_hand_computed():
    layer = 10 * PAGE
    p = plan_paging([layer] * 8, fixed_bytes=3 * PAGE, budget_bytes=3 * PAGE + 2 * layer + 3 * layer + 5)
    assert p.slots == 2 and p.slot_bytes == layer
    assert p.resident == (1, 4, 6) and p.paged == (0, 2, 3, 5, 7)
    assert p.bytes_paged_per_token == 5 * layer and p.peak_bytes <= p.budget_bytes
    assert p.decode_tokens_per_s(50 * layer) == pytest.approx(10.0)  # 5 layers paged at 50 layers/s
    assert p.decode_tokens_per_s(50 * layer, resident_tokens_per_s=4.0) == pytest.approx(4.0)
    # 3/8 of a token at 8 tokens/s + 5/8 at 1 token/s = 0.671875 s > 0.1 s of reading
    assert p.decode_tokens_per_s(50 * layer, 8.0, 1.0) == pytest.approx(1 / 0.671875)
    assert p.decode_tokens_per_s(5 * layer, 8.0, 100.0) == pytest.approx(1.0)  # storage-bound: 1 s of reading
    assert plan_paging([layer] * 8, 0, 8 * layer).paged == ()  # fits: nothing paged, no slots
    with pytest.raises(MemoryBudgetError, match="at least 81,920"):
        plan_paging([layer - 7] * 8, 0, 2 * layer - 1, slots=2)  # slots are page-rounded


def test_spread_is_even():
    assert spread(8, 0) == ()
    assert spread(8, 2) == (2, 6)
    assert spread(8, 4) == (1, 3, 5, 7)
    assert spread(5, 5) == (0, 1, 2, 3, 4)
    assert page_round(1) == PAGE and page_round(PAGE) == PAGE


@pytest.mark.parametrize("text,want", [("50%", 500), ("12.5%", 125), ("700", 700), (300, 300), ("1e3", 1000)])
def test_parse_budget(text, want):
    assert parse_budget(text, 1000) == want


@pytest.mark.parametrize("text", ["0", "-5", "150%", "lots", "0%"])
def test_parse_budget_rejects(text):
    with pytest.raises(ConfigError, match="--memory-budget"):
        parse_budget(text, 1000)


def test_runtime_options_validate_the_budget():
    with pytest.raises(ConfigError):
        rt.options.RuntimeOptions(memory_budget="half")


def test_paging_imports_neither_torch_nor_transformers():
    code = ("import sys, edge_sdk.runtime.paging.backend, edge_sdk.runtime.paging.select; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_run_and_bench_with_memory_budget(deep_bundle, capsys, caplog):
    import json
    import logging

    from edge_sdk.cli.main import main

    bundle = str(deep_bundle("qwen2"))
    common = [bundle, "--provider", "cpu", "--accuracy-level", "1", "--threads", "1"]
    outs = []
    for extra in ([], ["--memory-budget", "25%"]):
        with caplog.at_level(logging.INFO, logger="edge_sdk.runtime"):
            assert main(["run", *common, "--prompt", "paging", "--max-tokens", "6", "--json", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["token_ids"] == outs[1]["token_ids"]
    assert "streaming layers from storage" in caplog.text  # it says so
    assert main(["bench", *common, "--memory-budget", "25%", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["backend"]["backend"] == "onnxruntime-paged"
    assert len(result["backend"]["paging"]["paged_layers"]) == LAYERS
    assert main(["run", *common, "--prompt", "x", "--memory-budget", "half"]) != 0


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_planner_models_the_fused_executor_exactly(deep_bundle, arch):
    """The planner's sidecar sizes (edge_sdk.planner.fused_layer_bytes) equal the bytes the fused
    executor streams per layer and holds outside the layers, so its paged plan is the executor's."""
    import json

    from edge_sdk.modelspec import shape_from_config
    from edge_sdk.planner import QuantSpec, fused_layer_bytes
    from edge_sdk.runtime.paging.fused import layer_spans, sidecar_fixed_bytes

    bundle = deep_bundle(arch)
    model = rt.load(bundle, memory_budget="50%", **EXACT)
    be = model.backend
    meta = json.loads((be.file.path.parent / "fused.json").read_text())
    shape = shape_from_config(model.manifest["source"]["config"])
    layers, fixed = fused_layer_bytes(shape, QuantSpec(group_size=model.manifest["quantization"]["group_size"]))
    assert layers == [n for _, n in layer_spans(meta["tensors"], LAYERS)]
    assert fixed == sidecar_fixed_bytes(meta["tensors"])
    assert be.probe is not None and be.plan == plan_pipelined(layers, fixed, be.options.budget_bytes, be.probe)
    be.close()


def test_decode_model_with_session_builds_by_hand():
    layer = 10 * PAGE
    # 8 layers; 5 layer-sized buffers (2 slots + 3 sessions) and 2 resident layers fit
    p = plan_paging([layer] * 8, fixed_bytes=PAGE, budget_bytes=PAGE + 7 * layer, slots=2, sessions=3)
    assert len(p.resident) == 2 and len(p.paged) == 6 and p.peak_bytes == PAGE + 7 * layer
    # reading 6 paged layers at 1 layer per second: 6 s bounds it
    assert p.decode_tokens_per_s(layer, 4.0, 4.0, build_s=0.5, cores=2, threads=2) == pytest.approx(1 / 6.0)
    # fast storage: compute 8/8 / 4 = 0.25 s, builds 6 * 0.5 = 3 s on 2 builders = 1.5 s,
    # the CPU (0.25 * 2 + 3) / 2 = 1.75 s bounds it
    assert p.decode_tokens_per_s(1000 * layer, 4.0, 4.0, build_s=0.5, cores=2, threads=2) == pytest.approx(1 / 1.75)
    # one builder (two sessions alive at most): the builds in series, 3 s, and the one slot held for
    # each layer's read (0.001 s) and build: 6 * 0.501 s
    q = plan_paging([layer] * 8, fixed_bytes=PAGE, budget_bytes=PAGE + 5 * layer, slots=1, sessions=2)
    assert len(q.paged) == 6
    assert q.decode_tokens_per_s(1000 * layer, 4.0, 4.0, build_s=0.5, cores=2, threads=1) == pytest.approx(1 / 3.006)
    # a slot waits for its layer to run too where sessions read their slot: + 1/8 of 0.25 s each
    assert q.decode_tokens_per_s(1000 * layer, 4.0, 4.0, build_s=0.5, cores=2, threads=1,
                                 release_early=False) == pytest.approx(1 / (6 * (0.001 + 0.5 + 0.25 / 8)))


def test_plan_shape_chosen_from_the_probe_by_hand():
    """With a measured build, a third slot (bought with a resident layer) is taken where the slots'
    turnover bounds the two-slot plan, and not where storage bounds both."""
    from edge_sdk.paging_model import BuildProbe, plan_pipelined

    layer = 10 * PAGE
    budget = PAGE + 7 * layer  # (3 slots + 3 sessions) leaves 1 layer resident, (2 + 3) leaves 2
    assert plan_pipelined([layer] * 8, PAGE, budget).slots == 2  # without a probe: the default shape
    # read 0.2 s, build 0.5 s per layer, 8 layers compute in 0.08 s, 4 cores:
    # (2, 3): slots 6 * 0.7 / 2 = 2.1 s; (3, 3): builds 7 * 0.5 / 2 builders = 1.75 s -> 3 slots
    fast = BuildProbe(layer / 0.2, 0.5, 0.01, cores=4, threads=2)
    p = plan_pipelined([layer] * 8, PAGE, budget, fast)
    assert (p.slots, p.sessions, len(p.paged)) == (3, 3, 7)
    assert fast.tokens_per_s(p) == pytest.approx(1 / 1.75)
    # read 1 s per layer: storage bounds (2, 3) at 6 s and (3, 3) at 7 s; one slot and one session
    # leave 5 layers resident: 3 paged, each holding the slot 1.5 s -> 4.5 s, the fastest
    slow = BuildProbe(layer / 1.0, 0.5, 0.01, cores=4, threads=2)
    q = plan_pipelined([layer] * 8, PAGE, budget, slow)
    assert (q.slots, q.sessions, len(q.paged)) == (1, 1, 3) and slow.tokens_per_s(q) == pytest.approx(1 / 4.5)


def test_fused_executor_keeps_no_mapping_of_the_sidecar(deep_bundle):
    """Resident layers are read into a staging slot and the tail built from a memory map of the sidecar;
    once the sessions own the prepacked matrices (and hold copies of the rest), the file is no longer
    mapped, so its pages are neither pinned nor counted in the process's memory. In a child process:
    other tests' models map the same sidecar."""
    import json
    import textwrap

    code = textwrap.dedent(f"""
        import json
        import edge_sdk.runtime as rt
        model = rt.load({str(deep_bundle("qwen2"))!r}, memory_budget="50%", provider="cpu", accuracy_level=1, threads=1,
                        log_provider=False)
        be = model.backend
        with open("/proc/self/maps") as f:
            mapped = str(be.file.path) in f.read()
        print(json.dumps({{"mapped": mapped, "owned": be.probe.release_early, "resident": len(be.plan.resident)}}))
    """)
    r = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert r["owned"] and r["resident"] > 0 and not r["mapped"]
