"""The fused onnxruntime graph (runtime/backends/fused/) against the bundle's own graph and hand references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edge_sdk
from edge_sdk.errors import ConfigError
from edge_sdk.runtime.backends import fused as fg
from edge_sdk.runtime.backends import hugepages as hp

ort = pytest.importorskip("onnxruntime")


def pack_onnx_int4(q: np.ndarray) -> np.ndarray:
    """Reference ONNX INT4 packing of signed values, row-major, first element in the low nibble."""
    flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, 0)
    return flat[0::2] | (flat[1::2] << 4)


def run_matmulnbits(a, b, scales, k, n, block, level=1):
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
                          initializer=[numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]


@pytest.mark.parametrize("k,n,block", [(256, 96, 128), (512, 40, 32), (128, 7, 64)])
def test_repacked_int4_reproduces_q_times_scale(k, n, block):
    rng = np.random.default_rng(k + n)
    q = rng.integers(-8, 8, (k, n)).astype(np.int8)  # the bundle's signed int4, [in, out]
    scales = (rng.random((k // block, n)) * 0.02 + 0.001).astype(np.float16)
    b, s = fg.to_matmulnbits(pack_onnx_int4(q), scales, k, n, block)
    assert b.shape == (n, k // block, block // 2) and b.dtype == np.uint8 and s.shape == (n, k // block)
    # bit level: nibble j of column c, block i is q[i * block + j, c] + 8
    lo, hi = b & 0xF, b >> 4
    unpacked = np.stack([lo, hi], axis=-1).reshape(n, k).astype(np.int16) - 8
    np.testing.assert_array_equal(unpacked.T, q)
    # numerically: MatMulNBits at level 1 equals x @ (q * scale) in fp32
    w = q.astype(np.float32) * np.repeat(scales.astype(np.float32), block, axis=0)
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(run_matmulnbits(x, b, s.reshape(-1), k, n, block), x @ w, rtol=1e-5, atol=1e-5)


def test_repack_refuses_a_partial_block():
    with pytest.raises(Exception, match="group size"):
        fg.to_matmulnbits(np.zeros(96 * 4 // 2, np.uint8), np.zeros((1, 4), np.float16), 96, 4, 64)


def load_pair(bundle, tmp_path, level=1, **kw):
    common = dict(provider="cpu", accuracy_level=level, threads=1, engine_cache_dir=str(tmp_path / "engines"), log_provider=False)
    return (edge_sdk.load(bundle, graph="fused", **common, **kw), edge_sdk.load(bundle, graph="standard", **common, **kw))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fused_graph_equals_bundle_graph(tiny_bundle, tmp_path, arch):
    """Logits and KV cache of every step: prompt with left padding (batch 2), decode steps, and several new
    tokens over a past in batch 2 (fed token by token) and in batch 1."""
    fused, std = load_pair(tiny_bundle(arch), tmp_path)
    f, s = fused.backend, std.backend
    assert f.describe()["graph_form"] == "fused" and s.describe()["graph_form"] == "standard"
    vocab = f.io.vocab_size
    rng = np.random.default_rng(1)
    ids = rng.integers(3, vocab, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    cf, cs = f.new_cache(2, 64), s.new_cache(2, 64)

    def same(a, b, rows_mask=None):
        sel = (slice(None),) if rows_mask is None else (rows_mask.astype(bool),)
        np.testing.assert_allclose(a[sel], b[sel], rtol=1e-4, atol=1e-4)
        for layer in range(f.io.num_layers):
            for kind in range(2):
                keep = cs.mask.astype(bool)  # padded slots hold don't-care values
                np.testing.assert_allclose(cf.past(layer, kind).transpose(0, 2, 1, 3)[keep],
                                           cs.past(layer, kind).transpose(0, 2, 1, 3)[keep], rtol=1e-4, atol=1e-4)

    same(f.forward(ids, cf, mask), s.forward(ids, cs, mask), mask)
    for _ in range(3):
        nxt = rng.integers(3, vocab, (2, 1))
        lf, ls = f.forward(nxt, cf), s.forward(nxt, cs)
        same(lf, ls)
        assert (lf.argmax(-1) == ls.argmax(-1)).all()
    more = rng.integers(3, vocab, (2, 4))
    same(f.forward(more, cf), s.forward(more, cs))
    one_f, one_s = f.new_cache(1, 32), s.new_cache(1, 32)
    np.testing.assert_allclose(f.forward(ids[:1, :5], one_f), s.forward(ids[:1, :5], one_s), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f.forward(ids[:1, 5:], one_f), s.forward(ids[:1, 5:], one_s), rtol=1e-4, atol=1e-4)


def test_fused_and_standard_generate_the_same_text(tiny_bundle, tmp_path):
    fused, std = load_pair(tiny_bundle("qwen2"), tmp_path, level=4)
    a = fused.generate("The sky is", max_new_tokens=12, ignore_eos=True)
    b = std.generate("The sky is", max_new_tokens=12, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_rotary_tables_come_from_the_bundle_graph(tiny_bundle):
    """Default rope (qwen2) against the formula; llama3-scaled rope (llama) against transformers' tables."""
    for arch in ("qwen2", "llama"):
        bundle = Path(tiny_bundle(arch))
        m = json.loads((bundle / "manifest.json").read_text())
        inv_freq, scaling = fg.rope_from_graph(bundle / m["graphs"]["fp32"]["file"])
        if arch == "qwen2":
            d = m["architecture"]["head_dim"]
            want, want_scale = 1.0 / m["architecture"]["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d), 1.0
        else:
            pytest.importorskip("transformers")
            from edge_sdk.converters.archs import arch_for
            from edge_sdk.converters.decoder import rope_tables

            cfg = m["source"]["config"]
            t, want_scale = rope_tables(cfg, arch_for(cfg))
            want = t.numpy()
        np.testing.assert_allclose(inv_freq, want, rtol=1e-6)
        assert scaling == pytest.approx(want_scale)


def test_sidecar_is_built_once_and_rebuilt_when_damaged(tiny_bundle, tmp_path):
    bundle = tiny_bundle("qwen2")
    opts = dict(provider="cpu", threads=1, engine_cache_dir=str(tmp_path / "e"), log_provider=False)
    m1 = edge_sdk.load(bundle, **opts)
    side = m1.backend.graph_path.parent / fg.WEIGHTS_NAME
    stamp = side.stat().st_mtime_ns
    edge_sdk.load(bundle, **opts)
    assert side.stat().st_mtime_ns == stamp  # reused
    ids = np.array([[5, 6, 7]])
    want = m1.backend.forward(ids, m1.backend.new_cache(1, 8))
    del m1  # its session maps the file that is cut short next
    with open(side, "r+b") as f:  # a write cut short
        f.truncate(side.stat().st_size // 2)
    m3 = edge_sdk.load(bundle, **opts)
    assert side.stat().st_size == json.loads((side.parent / fg.METADATA).read_text())["weights_bytes"]
    np.testing.assert_array_equal(m3.backend.forward(ids, m3.backend.new_cache(1, 8)), want)
    assert not list(side.parent.parent.glob(".*partial*"))


def test_graph_choice_and_limits(tiny_bundle, tmp_path):
    bundle = tiny_bundle("qwen2")
    with pytest.raises(ConfigError, match="graph"):
        edge_sdk.load(bundle, graph="fast")
    m = edge_sdk.load(bundle, provider="cpu", max_seq_len=64, engine_cache_dir=str(tmp_path), log_provider=False)
    limit = m.backend.fused.positions
    assert limit >= 64
    with pytest.raises(ConfigError, match="positions"):
        m.backend.new_cache(1, limit + 1)


def test_huge_range_arithmetic():
    mib = 1 << 20
    regions = {(3 * mib, 13 * mib), (64 * mib, 66 * mib), (100 * mib, 108 * mib)}
    # 3..13 MiB -> 4..12 MiB; 64..66 MiB is below the size floor; 100..108 is exactly aligned
    assert hp.huge_ranges(regions) == [(4 * mib, 12 * mib), (100 * mib, 108 * mib)]


def test_anonymous_regions_reads_private_writable_unnamed_mappings(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "55d0a0000000-55d0a0021000 rw-p 00000000 00:00 0                          [heap]\n"
        "7f0000000000-7f0010000000 rw-p 00000000 00:00 0 \n"
        "7f0010000000-7f0020000000 r--p 00000000 08:01 123                        /usr/lib/libfoo.so\n"
        "7f0020000000-7f0030000000 rw-s 00000000 00:05 9                          /dev/shm/x\n"
        "7f0030000000-7f0031000000 rw-p 00000000 08:01 124                        /data/file\n")
    assert hp.anonymous_regions(str(maps)) == {(0x55D0A0000000, 0x55D0A0021000), (0x7F0000000000, 0x7F0010000000)}


def test_new_mappings_are_advised(tmp_path):
    if hp.thp_mode() in ("never", "unavailable"):
        pytest.skip(f"transparent huge pages are {hp.thp_mode()} here")
    before = hp.anonymous_regions()
    block = np.ones(64 << 20, np.uint8)  # a fresh 64 MiB mapping
    advice = hp.advise_new(before)
    start = block.ctypes.data
    assert advice.bytes >= (start + block.nbytes) // hp.HUGE * hp.HUGE - -(-start // hp.HUGE) * hp.HUGE
    assert advice.mode == hp.thp_mode()


def test_a_new_version_of_the_bundle_replaces_its_old_sidecar(tiny_bundle, tmp_path):
    import shutil

    bundle, other = tmp_path / "b", tmp_path / "other"
    shutil.copytree(tiny_bundle("qwen2"), bundle)
    shutil.copytree(tiny_bundle("llama"), other)
    engines = tmp_path / "engines"
    opts = dict(provider="cpu", threads=1, engine_cache_dir=str(engines), log_provider=False)
    first = edge_sdk.load(bundle, **opts).backend.graph_path.parent
    edge_sdk.load(other, **opts)
    assert len(list(engines.glob("ort-fused/*/fused.json"))) == 2
    # a new release of the model copied over the same directory (here: another manifest)
    m = json.loads((bundle / "manifest.json").read_text())
    m["created_by"] += " (rebuilt)"
    (bundle / "manifest.json").write_text(json.dumps(m))
    second = edge_sdk.load(bundle, **opts).backend.graph_path.parent
    assert second != first and not first.exists()  # the old entry of this directory is gone
    metas = [json.loads(p.read_text()) for p in engines.glob("ort-fused/*/fused.json")]
    assert sorted(x["bundle_path"] for x in metas) == sorted([str(bundle.absolute()), str(other.absolute())])


@pytest.mark.parametrize("tied", [False, True])
def test_fp16_lm_head_and_tied_embeddings(tmp_path, tied):
    """Bundles converted with an fp16 lm_head (untied, or tied to the embeddings): the fused graph reads
    it from the sidecar ([in, out]; the embedding table transposed when tied) and matches the bundle's graph."""
    pytest.importorskip("torch")
    from edge_sdk.converters import convert
    from edge_sdk.converters.tiny import build_model_dir, build_tokenizer, default_calibration_text, tiny_config

    tok = build_tokenizer([default_calibration_text()])
    cfg = tiny_config("qwen2", tok.get_vocab_size(), tie_word_embeddings=tied, num_hidden_layers=6)  # 6: room to page
    src = build_model_dir(tmp_path / "hf", "qwen2", seed=3, config=cfg, tokenizer=tok)
    bundle = tmp_path / "bundle"
    convert(src, bundle, method="rtn", lm_head_dtype="fp16", eval_tokens=128, progress=False)
    meta = json.loads((bundle / "manifest.json").read_text())
    assert "lm_head.qweight" not in meta["weights"]["tensors"]
    fused, std = load_pair(bundle, tmp_path)
    ids = np.array([[4, 9, 33, 7, 100]])
    cf, cs = fused.backend.new_cache(1, 16), std.backend.new_cache(1, 16)
    np.testing.assert_allclose(fused.backend.forward(ids, cf), std.backend.forward(ids, cs), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fused.backend.forward(ids[:, :1], cf), std.backend.forward(ids[:, :1], cs), rtol=1e-4, atol=1e-4)
    # the paged executor's tail (built once, optimized: the fp16 head's Cast folded) gives the same logits
    from edge_sdk.runtime.paging.fused import FusedPagedBackend

    paged = edge_sdk.load(bundle, provider="cpu", accuracy_level=1, threads=1, engine_cache_dir=str(tmp_path / "engines"),
                          log_provider=False, memory_budget="50%")
    assert isinstance(paged.backend, FusedPagedBackend) and paged.backend.plan.paged
    cp, cs = paged.backend.new_cache(1, 16), std.backend.new_cache(1, 16)
    np.testing.assert_allclose(paged.backend.forward(ids, cp), std.backend.forward(ids, cs), rtol=1e-4, atol=1e-4)
    paged.backend.close()


def test_concurrent_loads_build_the_sidecar_once(tiny_bundle, tmp_path):
    """Two processes loading the same bundle at once (a daemon and a CLI): one builds, the other waits
    and uses the same entry; both generate the same tokens."""
    import subprocess
    import sys

    bundle = tiny_bundle("llama")
    code = ("import edge_sdk, sys; m = edge_sdk.load(sys.argv[1], provider='cpu', threads=1, engine_cache_dir=sys.argv[2], "
            "log_provider=False); print(m.generate('x', max_new_tokens=5, ignore_eos=True).token_ids, "
            "m.backend.graph_path.parent.name)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(bundle), str(tmp_path / "e")], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and len(list((tmp_path / "e").glob("ort-fused/*/fused.json"))) == 1


def test_bench_counts_the_bytes_the_fused_graph_reads(tiny_bundle, tmp_path):
    """By hand from the manifest: int4 matrices as stored, scales at 4 bytes instead of 2, norms and biases
    at 4 instead of 2, q/k/v packed, plus one fp16 embedding row; every tensor in the sidecar page aligned
    does not change what is read."""
    m = edge_sdk.load(tiny_bundle("qwen2"), provider="cpu", threads=1, engine_cache_dir=str(tmp_path), log_provider=False)
    t = m.manifest["weights"]["tensors"]
    want = 0
    for name, meta in t.items():
        if name == "model.embed_tokens.weight":
            want += meta["shape"][1] * 2
        elif meta["dtype"] == "int4":
            want += meta["nbytes"]
        else:  # fp16 scales, norms, biases -> fp32
            want += 2 * meta["nbytes"]
    assert m.backend.weight_bytes_per_token == want


def test_cli_chooses_the_graph(tiny_bundle, capsys):
    from edge_sdk.cli.main import main

    bundle = str(tiny_bundle("qwen2"))
    forms = {}
    for graph in ("auto", "standard"):
        assert main(["bench", bundle, "--graph", graph, "--no-huge-pages", "--prompt-tokens", "4", "--new-tokens", "2",
                     "--repeats", "1", "--threads", "1", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        forms[graph] = (out["backend"]["graph_form"], out["backend"]["huge_pages"]["advised_bytes"])
    assert forms == {"auto": ("fused", 0), "standard": ("standard", 0)}


def test_fused_cache_appends_in_place(tiny_bundle, tmp_path):
    """The fused graph's cache is one buffer per layer and kind, bound as past and present: a decode step
    writes only the new position, the buffer never moves, and select/merge keep every row exact."""
    from edge_sdk.runtime.backends.kv_cache import KVCache, SharedKVCache

    fused, std = load_pair(tiny_bundle("qwen2"), tmp_path)
    f, s = fused.backend, std.backend
    cf, cs = f.new_cache(2, 32), s.new_cache(2, 32)
    assert type(cf) is SharedKVCache and type(cs) is KVCache and cf.nbytes * 2 == cs.nbytes
    addr = cf.binding(0, 0)[0]
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    f.forward(ids, cf, mask), s.forward(ids, cs, mask)
    before = cf.past(1, 1).copy()
    lf, ls = f.forward(np.array([[3], [4]]), cf), s.forward(np.array([[3], [4]]), cs)
    assert cf.binding(0, 0)[0] == addr
    np.testing.assert_array_equal(cf.past(1, 1)[:, :, :4], before)  # earlier positions untouched
    np.testing.assert_allclose(lf, ls, rtol=1e-4, atol=1e-4)
    # drop row 0, then merge it back beside a fresh single-row cache: logits follow the standard graph's
    sf, ss = cf.select([1]), cs.select([1])
    assert type(sf) is SharedKVCache
    np.testing.assert_allclose(f.forward(np.array([[20]]), sf), s.forward(np.array([[20]]), ss), rtol=1e-4, atol=1e-4)
    one_f, one_s = f.new_cache(1, 32), s.new_cache(1, 32)
    f.forward(np.array([[1, 2]]), one_f), s.forward(np.array([[1, 2]]), one_s)
    mf, ms = SharedKVCache.merge([sf, one_f], 32), KVCache.merge([ss, one_s], 32)
    np.testing.assert_allclose(f.forward(np.array([[30], [31]]), mf), s.forward(np.array([[30], [31]]), ms), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["deepseek-llm (MHA)", "deepseek-coder (linear rope)"])
def test_llama_family_variants(tmp_path, variant):
    """deepseek-llm attends with as many KV heads as query heads; deepseek-coder scales rope linearly.
    The fused graph (tables read from the bundle's graph) matches the bundle's graph on both, and the
    generation through select/merge-free greedy decoding gives the same tokens."""
    pytest.importorskip("torch")
    from edge_sdk.converters import convert
    from edge_sdk.converters.tiny import build_model_dir, build_tokenizer, default_calibration_text, tiny_config

    tok = build_tokenizer([default_calibration_text()])
    if variant.startswith("deepseek-llm"):
        extra = dict(num_key_value_heads=4, rope_scaling=None, rope_theta=10000.0)
    else:
        extra = dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=100000.0)
    cfg = tiny_config("llama", tok.get_vocab_size(), **extra)
    src = build_model_dir(tmp_path / "hf", "llama", seed=5, config=cfg, tokenizer=tok)
    bundle = tmp_path / "bundle"
    convert(src, bundle, method="rtn", eval_tokens=128, progress=False)
    fused, std = load_pair(bundle, tmp_path)
    ids = np.array([[4, 9, 33, 7, 100, 12, 300]])
    cf, cs = fused.backend.new_cache(1, 600), std.backend.new_cache(1, 600)
    np.testing.assert_allclose(fused.backend.forward(ids, cf), std.backend.forward(ids, cs), rtol=1e-4, atol=1e-4)
    for t in (5, 77, 3):
        np.testing.assert_allclose(fused.backend.forward(np.array([[t]]), cf), std.backend.forward(np.array([[t]]), cs),
                                   rtol=1e-4, atol=1e-4)
    assert fused.generate("The sky", max_new_tokens=8, ignore_eos=True).token_ids == \
           std.generate("The sky", max_new_tokens=8, ignore_eos=True).token_ids


def test_huge_pages_can_be_collapsed_in_the_background():
    import time

    if hp.thp_mode() in ("never", "unavailable"):
        pytest.skip(f"transparent huge pages are {hp.thp_mode()} here")
    import mmap

    before = hp.anonymous_regions()
    # a fresh anonymous mapping: an earlier test in this process may have left glibc serving large
    # allocations from memory it already holds (paging raises its mmap and trim thresholds)
    mapping = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block = np.frombuffer(mapping, np.uint8)
    block[:] = 1
    advice = hp.advise_new(before, background=True)
    assert advice.bytes > 0
    deadline = time.monotonic() + 60
    while advice.collapsing and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not advice.collapsing and 0 <= advice.collapsed <= advice.bytes
    assert block.sum() == block.size  # the memory is intact after its pages moved


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_layer_and_tail_graphs_are_already_optimized(tiny_bundle, tmp_path, arch):
    """The paged executor builds its sessions with onnxruntime's optimizers off; that is exact only if
    they would change nothing: the optimized graph at ORT_ENABLE_ALL has the same compute nodes."""
    import collections

    import onnx

    from edge_sdk.runtime.paging.fused import layer_roles

    model = edge_sdk.load(tiny_bundle(arch), provider="cpu", graph="fused", threads=1, log_provider=False,
                          engine_cache_dir=str(tmp_path / "engines"))
    handle = model.backend.fused
    meta = handle.metadata()
    tensors = meta["tensors"]
    s = fg.Shape.from_manifest(model.manifest)
    roles = layer_roles(tensors, 0)
    graphs = {"layer": fg.build_layer_graph(s, roles, 4, qkv_bias="qkv.bias" in roles),
              "tail": fg.build_tail_graph(s, {n: t for n, t in tensors.items() if not n.startswith(("model.layers.", "rope."))}, 4)}
    mm = np.memmap(handle.sidecar_dir / fg.WEIGHTS_NAME, np.uint8, mode="r")
    for what, g in graphs.items():
        names = {i.name for i in g.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
        key = {"layer": lambda n: f"model.layers.0.{n[len('layer.'):]}", "tail": lambda n: n}[what]
        ops = {}
        for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            so.optimized_model_filepath = str(tmp_path / f"{what}-{level}.onnx")
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(handle.sidecar_dir))
            keep = []
            for n in names:
                t = tensors[key(n)]
                keep.append(ort.OrtValue.ortvalue_from_numpy(np.array(mm[t["offset"]:t["offset"] + t["nbytes"]])
                                                             .view(t["dtype"]).reshape(t["shape"])))
                so.add_initializer(n, keep[-1])
            ort.InferenceSession(g.SerializeToString(), so, providers=["CPUExecutionProvider"])
            saved = onnx.load(str(tmp_path / f"{what}-{level}.onnx"), load_external_data=False)
            ops[level] = collections.Counter(n.op_type for n in saved.graph.node if n.op_type != "Identity")
        assert ops["ORT_ENABLE_ALL"] == ops["ORT_DISABLE_ALL"], what
        assert ops["ORT_DISABLE_ALL"]["QuickGelu"] == (1 if what == "layer" else 0)


def test_bench_peak_memory_leaves_out_the_bandwidth_probe(tiny_bundle, tmp_path):
    """bench measures read bandwidth with large buffers of its own after the runs; the peak memory it
    reports is the model's, taken before them. In a child process: the peak is process-wide."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import json, numpy as np, edge_sdk
        from edge_sdk.runtime.generate import bench as b

        def probe():  # stands in for the bandwidth probe: 1 GiB touched
            buf = np.ones(1 << 30, np.uint8)
            return float(buf[::4096].sum() > 0) * 10.0

        b.read_bandwidth_gbps = probe
        m = edge_sdk.load({str(tiny_bundle("qwen2"))!r}, provider="cpu", threads=1, log_provider=False,
                          engine_cache_dir={str(tmp_path)!r})
        out = b.bench(m, prompt_tokens=4, new_tokens=2, repeats=1)
        print(json.dumps({{"reported": out["peak_rss_bytes"], "after": b.peak_rss_bytes()}}))
    """)
    r = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert r["after"] - r["reported"] >= 300 << 20
