"""Expert paging (runtime/paging/experts.py, moe_split.py): a DeepSeek-V2 / V3 bundle under a memory
budget below its weights keeps attention, routers and shared experts resident and reads routed experts
on demand into an expert cache. Greedy tokens equal the resident runtime's, itself equal to transformers
on the bundle's dequantized weights (batch 1 with prompts of 1 and 7 tokens, left-padded batch 2);
logits and KV caches equal the resident runtime's; what is read equals a hand count from the manifest;
the cache policies evict as LRU and LFU-DA define them; too small a budget and unsupported graphs are
refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from hypothesis import given, settings, strategies as st  # noqa: E402

import edge_sdk  # noqa: E402
from edge_sdk.cli.main import main  # noqa: E402
from edge_sdk.errors import BundleError, ConfigError, MemoryBudgetError  # noqa: E402
from edge_sdk.paging_model import PAGE  # noqa: E402
from edge_sdk.runtime.backends.kv_cache import ModelIO  # noqa: E402
from edge_sdk.runtime.paging.expert_cache import ExpertCache, LFUPolicy, LRUPolicy  # noqa: E402
from edge_sdk.runtime.paging.experts import ExpertPagedBackend, ExpertPagingOptions  # noqa: E402
from edge_sdk.runtime.paging.moe_split import moe_nodes, split  # noqa: E402
from test_generation_e2e import runtime_greedy  # noqa: E402

PROMPTS = [[7], [5, 17, 42, 7, 99, 3, 64]]
NEW = 8
CONVERT = dict(method="rtn", nsamples=4, seqlen=64, progress=False)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Tiny V2 and V3 checkpoints with 32 routed experts of width 256 per MoE layer (2 MoE layers), so
    that routed experts are most of the weights, as in V2-Lite, and a budget below the weights still
    leaves room for a cache."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edge_sdk.converters.tiny import build_model_dir, tiny_config

    out = {}
    for arch in ("deepseek_v2", "deepseek_v3"):
        cfg = {k: v for k, v in tiny_config(arch, 1024, n_routed_experts=32, moe_intermediate_size=256).items() if v is not None}
        root = tmp_path_factory.mktemp(f"{arch}-paged")
        out[arch] = root / "b"
        edge_sdk.convert(build_model_dir(root / "model", arch, seed=0, config=cfg), out[arch], **CONVERT)
    return out


def manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def weight_bytes(bundle) -> int:
    return sum(t["nbytes"] for t in manifest(bundle)["weights"]["tensors"].values())


def backend(bundle, budget, **kw) -> ExpertPagedBackend:
    m = manifest(bundle)
    return ExpertPagedBackend(bundle, m, bundle / "model.onnx", ModelIO.from_manifest(m), ExpertPagingOptions(budget, **kw),
                              threads=1, accuracy_level=1)


def expert_read_bytes(bundle, layer: int, e: int) -> int:
    """Bytes one expert read takes, by hand: its four slices of the stacked tensors, each widened to pages."""
    t = manifest(bundle)["weights"]["tensors"]
    total = 0
    for name in ("gate_up_proj.qweight", "gate_up_proj.scales", "down_proj.qweight", "down_proj.scales"):
        s = t[f"model.layers.{layer}.mlp.experts.{name}"]
        per = s["nbytes"] // s["shape"][0]
        off = s["offset"] + e * per
        start = off - off % PAGE
        total += -(-(off + per - start) // PAGE) * PAGE
    return total


# ---- tokens and logits -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_paged_greedy_equals_the_resident_runtime(bundles, arch, policy):
    """The resident runtime's greedy tokens equal transformers' on these bundles' weights
    (test_deepseek_v2.py, test_deepseek_v3.py); paged, they are the same tokens."""
    bundle = bundles[arch]
    resident = edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1)
    model = edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1, memory_budget=weight_bytes(bundle) - 1,
                          expert_cache=policy)
    assert model.backend.describe()["backend"] == "onnxruntime-expert-paged"
    b = model.backend
    assert 2 <= b.capacity < len(b.moe) * b.n_experts  # fewer experts cached than the model has: some are read again
    for p in PROMPTS:
        assert runtime_greedy(model, [p], NEW)[0] == runtime_greedy(resident, [p], NEW)[0]
    assert runtime_greedy(model, PROMPTS, NEW) == runtime_greedy(resident, PROMPTS, NEW)
    assert b.stats.misses > 0 and b.stats.hits > 0


@pytest.mark.parametrize("io", ["reader", "mmap"])
def test_paged_logits_equal_the_resident_runtime(bundles, io):
    bundle = bundles["deepseek_v2"]
    resident = edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1).backend
    m = manifest(bundle)
    k = m["architecture"]["moe"]["num_experts_per_tok"]
    paged = backend(bundle, weight_bytes(bundle) - 1, io=io)
    assert io == "mmap" or paged.capacity >= k
    ids = np.array([PROMPTS[1], [0, 0, 0, 4, 8, 15, 16]])
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    c1, c2 = resident.new_cache(2, 32), paged.new_cache(2, 32)
    a, b = resident.forward(ids, c1, mask), paged.forward(ids, c2, mask)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    for _ in range(4):
        nxt = a[:, -1].argmax(-1)[:, None]
        a, b = resident.forward(nxt, c1), paged.forward(nxt, c2)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    for layer in range(m["io"]["kv"]["num_layers"]):
        for kind in (0, 1):
            np.testing.assert_allclose(c2.past(layer, kind), c1.past(layer, kind), rtol=0, atol=1e-5)


def test_what_is_read_equals_a_hand_count(bundles):
    """Without read-ahead and with room for every expert, each (layer, expert) a step uses is read once,
    exactly its four page-widened slices; the same prompt again is all hits and reads nothing."""
    bundle = bundles["deepseek_v2"]
    b = backend(bundle, 10 * weight_bytes(bundle), prefetch="off")
    assert b.capacity == len(b.moe) * b.n_experts == 2 * 32
    used = set()
    orig = b._experts

    def spy(j, x, w):
        used.update((b.moe[j].layer, int(e)) for e in np.nonzero(w.max(0) > 0)[0])
        return orig(j, x, w)

    b._experts = spy
    ids = np.array([PROMPTS[1]])
    b.forward(ids, b.new_cache(1, 16))
    assert b.stats.misses == len(used) and b.stats.hits == 0
    assert b.stats.bytes_read == sum(expert_read_bytes(bundle, layer, e) for layer, e in used)
    read = b.stats.bytes_read
    b.forward(ids, b.new_cache(1, 16))
    assert b.stats.bytes_read == read and b.stats.misses == len(used) and b.stats.hits == len(used)


def test_read_ahead_predicts_from_the_next_router(bundles):
    """Decode steps read the next MoE layer's predicted experts ahead; every prediction is either used
    by that layer or counted as wasted, and none is cached unless used."""
    bundle = bundles["deepseek_v3"]
    b = backend(bundle, weight_bytes(bundle) - 1, prefetch="on")
    cache = b.new_cache(1, 32)
    logits = b.forward(np.array([PROMPTS[1]]), cache)
    for _ in range(12):
        logits = b.forward(logits[:, -1].argmax(-1)[:, None], cache)
    s = b.stats
    assert s.prefetch_issued > 0
    assert s.prefetch_hits + s.prefetch_wasted == s.prefetch_issued
    assert not b.pending
    assert s.uses == s.hits + s.prefetch_hits + s.misses
    assert s.reads <= s.misses + s.prefetch_issued  # a read ahead cancelled before it started reads nothing


def test_auto_read_ahead_stops_while_storage_is_the_limit(bundles):
    """prefetch "auto": read ahead while steps rarely wait for reads, not once waiting dominates."""
    bundle = bundles["deepseek_v3"]
    b = backend(bundle, weight_bytes(bundle) - 1)
    assert b._read_ahead()
    b.wait_share = 0.6
    assert not b._read_ahead()
    b.wait_share = 0.4
    assert b._read_ahead()
    with pytest.raises(ConfigError, match="expert read-ahead 'maybe' is not 'auto', 'on' or 'off'"):
        ExpertPagingOptions(1, prefetch="maybe")


def test_speculative_greedy_on_the_paged_backend_equals_plain(bundles):
    bundle = bundles["deepseek_v2"]
    model = edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1, memory_budget=weight_bytes(bundle) - 1)
    prompt = "def f(x): return x + 1\ndef g(x): return x + 1\ndef h(x): return x"
    plain = model.generate(prompt, max_new_tokens=12, ignore_eos=True, speculative=False)
    spec = model.generate(prompt, max_new_tokens=12, ignore_eos=True, speculative="prompt-lookup")
    assert spec.token_ids == plain.token_ids and len(plain.token_ids) == 12


def test_cli_run_pages_experts_with_either_policy(bundles, capsys):
    bundle = bundles["deepseek_v2"]
    outs = []
    for policy in ("lfu", "lru"):
        assert main(["run", str(bundle), "--prompt", "Hello", "--max-tokens", "6", "--provider", "cpu", "--accuracy-level", "1",
                     "--memory-budget", str(weight_bytes(bundle) - 1), "--expert-cache", policy, "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out)["text"])
    resident = edge_sdk.load(bundle, provider="cpu", accuracy_level=1).generate("Hello", max_new_tokens=6)
    assert outs == [resident.text, resident.text]


# ---- refusals ----------------------------------------------------------------------------------------------

def test_too_small_a_budget_is_refused_with_the_size_needed(bundles):
    bundle = bundles["deepseek_v2"]
    with pytest.raises(MemoryBudgetError) as e:
        backend(bundle, 800_000)
    msg = str(e.value)
    assert "leaves room for 0 routed experts" in msg and "a token needs 2" in msg and "\n" not in msg
    need = int(msg.split("at least ")[1].split(" bytes")[0].replace(",", ""))
    assert backend(bundle, need).capacity == 2  # exactly the size named is enough


def test_unknown_expert_cache_policy_refused():
    from edge_sdk.runtime.options import RuntimeOptions

    with pytest.raises(ConfigError, match="expert_cache 'fifo' is not 'lfu' or 'lru'"):
        RuntimeOptions(expert_cache="fifo")


@pytest.mark.parametrize("attr, value, words", [
    ("normalize_routing_weights", 1, "normalize_routing_weights=1; expert paging computes normalize_routing_weights=0 only"),
    ("activation_type", "gelu", "activation_type='gelu'"),
    ("expert_weight_bits", 8, "expert_weight_bits=8"),
])
def test_a_qmoe_node_paging_does_not_compute_is_refused(bundles, tmp_path, attr, value, words):
    g = onnx.load(str(bundles["deepseek_v2"] / "model.onnx"), load_external_data=False).graph
    node = next(n for n in g.node if n.op_type == "QMoE")
    for a in node.attribute:
        if a.name == attr:
            node.attribute.remove(a)
            break
    node.attribute.append(onnx.helper.make_attribute(attr, value))
    with pytest.raises(BundleError, match=words):
        moe_nodes(g, "b")


def test_a_graph_without_experts_is_refused(tiny_bundle):
    with pytest.raises(BundleError, match="no routed-expert"):
        split(tiny_bundle("qwen2") / "model.onnx")


def test_split_segments_cover_the_graph_once(bundles):
    """n MoE layers give n + 1 segments; presents and logits come out of exactly one segment each; no
    segment holds a routed expert's weights or the embedding table."""
    bundle = bundles["deepseek_v2"]
    s = split(bundle / "model.onnx")
    assert len(s.segments) == len(s.moe) + 1 == 3  # layers 1 and 2 are MoE
    outs = [o for seg in s.segments for o in seg.outputs if o == "logits" or o.startswith("present.")]
    assert sorted(outs) == sorted(o.name for o in onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph.output)
    for seg in s.segments:
        names = {t.name for t in onnx.load_from_string(seg.model).graph.initializer}
        assert not any(".mlp.experts." in n for n in names)
        assert "model.embed_tokens.weight" not in names


# ---- cache policies ----------------------------------------------------------------------------------------

def test_lru_evicts_the_least_recently_used():
    c = ExpertCache(2, "lru")
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1
    assert c.put("c", 3) == ["b"]
    assert c.put("d", 4, protected=frozenset({"a"})) == ["c"]
    assert set(c.entries) == {"a", "d"}


def test_lfu_keeps_the_most_used_and_ages():
    c = ExpertCache(2, "lfu")
    c.put("hot", 1)
    for _ in range(3):
        c.get("hot")
    c.put("x", 2)
    assert c.put("y", 3) == ["x"]  # hot (4 uses) stays, the one-use x goes
    # aging: newcomers start at the age of the last eviction, so a long enough run of new experts
    # eventually outranks an expert that stopped being used
    evicted = []
    for i in range(10):
        evicted += c.put(f"n{i}", i)
        c.get(f"n{i}")
    assert "hot" in evicted


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["lru", "lfu"]), st.integers(1, 6),
       st.lists(st.tuples(st.integers(0, 12), st.booleans()), min_size=1, max_size=80))
def test_cache_never_exceeds_capacity_and_keeps_what_it_just_took(policy, cap, ops):
    c = ExpertCache(cap, policy)
    for key, protect_prev in ops:
        prev = frozenset(list(c.entries)[:1]) if protect_prev and cap > 1 else frozenset()
        if c.get(key) is None:
            evicted = c.put(key, key, protected=prev)
            assert key in c.entries
            assert not (set(evicted) & prev)
        assert len(c) <= cap


def test_policies_are_what_they_claim_on_a_skewed_trace():
    """A skewed stream (one expert in two uses is from a small hot set) through a small cache: LFU keeps
    the hot set and hits more than LRU; both count every use."""
    rng = np.random.default_rng(0)
    trace = [int(rng.integers(0, 4)) if rng.random() < 0.5 else int(rng.integers(4, 64)) for _ in range(4000)]
    hits = {}
    for policy in ("lru", "lfu"):
        c, h = ExpertCache(6, policy), 0
        for k in trace:
            if c.get(k) is not None:
                h += 1
            else:
                c.put(k, k)
        hits[policy] = h
    assert hits["lfu"] > 1.3 * hits["lru"]


def test_an_empty_or_fully_protected_policy_names_no_victim():
    for policy in (LRUPolicy(), LFUPolicy()):
        assert policy.victim(frozenset()) is None
        policy.touch("a")
        assert policy.victim(frozenset({"a"})) is None and policy.victim(frozenset()) == "a"


def test_serve_pages_experts_and_answers_as_the_runtime(bundles):
    import openai

    from edge_sdk.runtime.generate.generation import GenerationConfig
    from edge_sdk.runtime.server.config import ServeConfig
    from edge_sdk.runtime.server.daemon import build_service
    from test_server_helpers import ServerThread

    bundle = bundles["deepseek_v2"]
    budget = str(weight_bytes(bundle) - 1)
    service = build_service(ServeConfig(bundle=str(bundle)).with_overrides(memory_weights_budget=budget))
    b = service.state.model.backend
    assert isinstance(b, ExpertPagedBackend)
    assert service.state.memory.layout.weights_bytes >= b.plan.peak_bytes  # the manager charges the executor's peak
    assert b.plan.peak_bytes <= int(budget)
    reference = edge_sdk.load(bundle, provider="cpu")
    prompt = "Experts stream from storage"
    want = "".join(c.text for c in reference.generator.stream([reference.tokenizer.encode(prompt)],
                                                              GenerationConfig(max_new_tokens=10, temperature=0.0)))
    with ServerThread(service.state) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = c.completions.create(model=s.state.model_id, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == want
    b.close()


def test_the_planner_sizes_the_expert_cache_as_the_runtime_does(bundles):
    """`edge-sdk plan` for an MoE model that does not fit: the same resident bytes and expert-cache size
    as the runtime's executor at the same budget, for V2 and V3 (router bias) bundles."""
    from edge_sdk.boards import get_board
    from edge_sdk.bundle import bundle_quant_fields
    from edge_sdk.modelspec import shape_from_config
    from edge_sdk.planner import QuantSpec, expert_paged_estimate

    board = get_board("orin-nano-8gb")
    for arch, bundle in bundles.items():
        m = manifest(bundle)
        s = shape_from_config(m["source"]["config"])
        q = QuantSpec(**bundle_quant_fields(bundle))
        for budget in (weight_bytes(bundle) - 1, 3 * weight_bytes(bundle) // 4, 10 * weight_bytes(bundle)):
            b = backend(bundle, budget)
            est = expert_paged_estimate(s, q, board, board.default_storage, budget)
            assert (est["resident_bytes"], est["cache_experts"], est["routed_experts"]) == (b.resident_bytes, b.capacity, 64), arch
            k = s.num_experts_per_tok
            assert est["bytes_paged_per_token"] == int(2 * k * b.layouts[0].nbytes * (1 - b.capacity / 64))
            b.close()


def test_plan_of_v2_lite_on_an_8gb_board_pages_experts():
    from edge_sdk.planner import plan, render

    p = plan("deepseek-v2-lite-chat", "orin-nano-8gb")
    assert not p.fits and p.paged["executor"] == "experts" and p.paged["feasible"]
    assert 0 < p.paged["cache_experts"] < p.paged["routed_experts"] == 26 * 64
    assert "routed experts through a cache of" in render(p)


@pytest.mark.parametrize("value, words", [
    (16, "not the stacked uint8 experts expected"),  # the manifest disagrees with the stacked tensors
    ("32", "does not say how many routed experts"), (0, "does not say how many routed experts"),
    (True, "does not say how many routed experts"), (None, "does not say how many routed experts"),
])
def test_a_manifest_whose_expert_count_is_wrong_is_refused(bundles, value, words):
    bundle = bundles["deepseek_v2"]
    m = manifest(bundle)
    m["architecture"]["moe"]["n_routed_experts"] = value
    with pytest.raises(BundleError, match=words) as e:
        ExpertPagedBackend(bundle, m, bundle / "model.onnx", ModelIO.from_manifest(m), ExpertPagingOptions(weight_bytes(bundle) - 1),
                           threads=1)
    assert "\n" not in str(e.value)


@settings(max_examples=40, deadline=None)
@given(st.fixed_dictionaries({k: st.one_of(st.just(v), st.integers(-2, 9), st.sampled_from(["swiglu", "gelu", "", "silu"]))
                              for k, v in (("expert_weight_bits", 4), ("activation_type", "swiglu"), ("swiglu_fusion", 1),
                                           ("normalize_routing_weights", 0), ("use_sparse_mixer", 0))}))
def test_qmoe_attributes_are_accepted_only_as_computed(bundles, attrs):
    """Any value of the attributes the host computes from: accepted exactly when every one is the value it
    computes, otherwise one line naming the attribute."""
    from edge_sdk.runtime.paging.moe_split import QMOE_ATTRS

    g = onnx.load(str(bundles["deepseek_v2"] / "model.onnx"), load_external_data=False).graph
    for node in (n for n in g.node if n.op_type == "QMoE"):
        for a in [a for a in node.attribute if a.name in attrs]:
            node.attribute.remove(a)
        node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attrs.items())
    if attrs == QMOE_ATTRS:
        assert len(moe_nodes(g, "b")) == 2
    else:
        with pytest.raises(BundleError) as e:
            moe_nodes(g, "b")
        assert "\n" not in str(e.value) and any(f"{k}=" in str(e.value) for k in attrs)
