"""`edge-sdk engine build` on DeepSeek-V2 / V3 bundles (runtime/backends/tensorrt/moe.py): the QMoE graph
rewritten to one If per routed expert over 2-D INT4 DequantizeLinear -> Gemm.

TensorRT cannot run here: the build runs against the contract fake (tests/trt_fake.py), whose parser
refuses what TensorRT's documentation says its parser refuses; the rewritten graph is checked in
onnxruntime against the bundle's QMoE graph on the same inputs (the formulation exact with fp32 experts,
within fp16 rounding with the engine's fp16 experts)."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import trt_fake  # noqa: E402
from edge_sdk.errors import ConfigError  # noqa: E402
from edge_sdk.runtime.backends.tensorrt import build as tb  # noqa: E402
from edge_sdk.runtime.backends.tensorrt import moe  # noqa: E402

ARCHS = ("deepseek_v2", "deepseek_v3")
SETTINGS = tb.EngineBuildSettings(max_batch=2, max_prompt=64, max_seq_len=256, opt_prompt=16, opt_past=64)


def manifest_of(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def steps(man, batch=2, prompt=7, seed=0):
    """A prefill of `prompt` tokens on an empty past, then (by run_steps) one decode token per row."""
    rng = np.random.default_rng(seed)
    kv = man["io"]["kv"]
    feeds = {"input_ids": rng.integers(0, man["architecture"]["vocab_size"], (batch, prompt)).astype(np.int64),
             "attention_mask": np.ones((batch, prompt), np.int64),
             "position_ids": np.tile(np.arange(prompt), (batch, 1)).astype(np.int64)}
    for i in range(kv["num_layers"]):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = np.zeros((batch, 1, 0, kv["head_dim"]), np.float32)
    return feeds


def run_steps(sess, man, feeds):
    """[prefill logits, decode logits]; the decode step feeds back the presents and each row's argmax."""
    out = sess.run(None, feeds)
    names = [o.name for o in sess.get_outputs()]
    b, t = feeds["input_ids"].shape
    nxt = {"input_ids": out[0][:, -1].argmax(-1)[:, None].astype(np.int64), "attention_mask": np.ones((b, t + 1), np.int64),
           "position_ids": np.full((b, 1), t, np.int64)}
    for name, value in zip(names[1:], out[1:]):
        nxt[name.replace("present.", "past_key_values.")] = value
    return [out[0], sess.run(None, nxt)[0]]


@pytest.fixture(scope="module", params=ARCHS)
def bundle(request, tiny_bundle):
    return tiny_bundle(request.param)


@pytest.mark.parametrize("expert_dtype, tol", [("float32", 1e-5), ("float16", 3e-2)])
def test_rewritten_graph_gives_the_qmoe_graphs_logits(bundle, tmp_path, expert_dtype, tol):
    """fp32 experts: the formulation itself (routing, interleaved gate / up, uint4 -> INT4 bytes) is exact up
    to summation order; fp16 experts (the engine's): within fp16 rounding, the same greedy tokens."""
    man = manifest_of(bundle)
    graph = moe.write_graph(bundle, man["graphs"]["fp32"]["file"], man, tmp_path / "trt", expert_dtype)
    ref, new = session(bundle / "model.onnx"), session(graph)
    for batch in (2, 1):  # batch 1 at decode: most experts unchosen, their else branch
        feeds = steps(man, batch=batch)
        for want, got in zip(run_steps(ref, man, feeds), run_steps(new, man, feeds)):
            assert np.abs(want - got).max() <= tol * np.abs(want).max()
            assert (want.argmax(-1) == got.argmax(-1)).all()


def test_every_expert_weight_is_read_inside_its_conditional(bundle, tmp_path):
    """Per MoE layer one If per routed expert, each reading only its own expert's INT4 weights, and no INT4
    weight of a routed expert read outside an If (what makes a step read only the chosen experts)."""
    man = manifest_of(bundle)
    model = onnx.load(str(moe.write_graph(bundle, "model.onnx", man, tmp_path / "trt")), load_external_data=False)
    moe_cfg = man["architecture"]["moe"]
    layers = man["architecture"]["num_layers"] - moe_cfg["first_k_dense_replace"]
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == layers * moe_cfg["n_routed_experts"]
    assert not [n for n in model.graph.node if n.op_type == "QMoE"]
    assert not any(".experts." in i for n in model.graph.node if n.op_type == "DequantizeLinear" for i in n.input)
    for n in ifs:
        then = next(a.g for a in n.attribute if a.name == "then_branch")
        expert = n.name.split("/e")[-1].split("/")[0]
        read = {i for m in then.node if m.op_type == "DequantizeLinear" for i in m.input}
        assert {r.split(".experts.")[1].split(".")[0] for r in read} == {expert}
    int4 = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4 and ".experts." in t.name}
    assert len(int4) == 2 * layers * moe_cfg["n_routed_experts"] and all(len(t.dims) == 2 for t in int4.values())


@pytest.mark.parametrize("graph, experts", [("fp16", "float16"), ("fp32", "float32")])
def test_engine_build_accepts_the_bundle_and_removes_its_scratch(bundle, tmp_path, monkeypatch, graph, experts):
    from dataclasses import replace

    trt, _ = trt_fake.install(monkeypatch)
    lines = []
    path, built = tb.build_engine(bundle, manifest_of(bundle), "agx-orin-64gb", trt, settings=replace(SETTINGS, graph=graph),
                                  cache_root=tmp_path, report=lines.append)
    meta = json.loads((path.parent / "engine.json").read_text())
    assert built and meta["graph"] == moe.GRAPH_FILE and meta["moe_experts"]["activation_dtype"] == experts
    assert meta["graph_kind"] == graph
    assert meta["moe_experts"]["source_graph"] == "model.onnx"
    assert any("routed experts" in m for m in lines)
    assert not list(tmp_path.glob(".moe-build-*"))  # the scratch (INT4 experts) is gone, the engine holds them
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(path.read_bytes())
    assert {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)} >= {"input_ids", "logits", "present.0.key"}


@pytest.mark.parametrize("graph", ["fp16", "fp32"])
def test_native_backend_on_the_engine_gives_the_cpu_backends_greedy_tokens(bundle, tmp_path, monkeypatch, graph):
    """TensorRTBackend (profiles, device KV of MLA latents) over the engine, against the bundle's QMoE graph
    on the CPU backend: prompts of 1 and 7 tokens, batch 2 left-padded, whole prefill then 4 greedy steps."""
    from dataclasses import replace

    from test_tensorrt_runtime import greedy

    from edge_sdk.runtime.backends.kv_cache import ModelIO
    from edge_sdk.runtime.backends.ort import OrtBackend
    from edge_sdk.runtime.backends.tensorrt.backend import TensorRTBackend

    trt, _ = trt_fake.install(monkeypatch)
    man = manifest_of(bundle)
    path, _ = tb.build_engine(bundle, man, "local", trt, settings=replace(SETTINGS, graph=graph), cache_root=tmp_path, report=lambda m: None)
    io = ModelIO.from_manifest(man)
    cpu = OrtBackend(bundle / "model.onnx", io, providers=["CPUExecutionProvider"], threads=1)
    prompts = [np.random.default_rng(i).integers(3, man["architecture"]["vocab_size"], n).tolist() for i, n in enumerate((1, 7))]
    assert greedy(TensorRTBackend(path, io, trt), prompts) == greedy(cpu, prompts)


def test_the_bundles_qmoe_graph_is_refused_by_name(bundle):
    errors = trt_fake.ParserRules(onnx.load(str(bundle / "model.onnx"), load_external_data=False)).errors
    assert errors and all("No importer registered for op: QMoE" in e for e in errors)


def test_fake_parser_takes_the_dense_graph(tiny_bundle):
    errors = trt_fake.ParserRules(onnx.load(str(tiny_bundle("qwen2") / "model.onnx"), load_external_data=False)).errors
    assert errors == []


def test_scratch_that_does_not_fit_is_one_line(bundle, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    trt, _ = trt_fake.install(monkeypatch)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(1 << 30, 1 << 30, 1024))
    with pytest.raises(ConfigError, match="needs .* MiB of scratch, 0 MiB free") as e:
        tb.build_engine(bundle, manifest_of(bundle), "agx-orin-64gb", trt, settings=SETTINGS, cache_root=tmp_path, report=lambda m: None)
    assert "\n" not in str(e.value) and not list(tmp_path.glob(".moe-build-*"))


# ---- the fake parser holds the documented rules ---------------------------------------------------------------


def _dq_graph(x_type=onnx.TensorProto.INT4, x_dims=(8, 128), scale_dims=(8, 1), axis=1, zero_point=None, x_const=True):
    from onnx import TensorProto, helper

    inits = [helper.make_tensor("s", TensorProto.FLOAT16, list(scale_dims), np.ones(int(np.prod(scale_dims)), np.float16).tolist())]
    inputs = []
    if x_const:
        inits.append(helper.make_tensor("q", x_type, list(x_dims), np.zeros(int(np.prod(x_dims)), np.int64).tolist()))
    else:
        inputs.append(helper.make_tensor_value_info("q", x_type, list(x_dims)))
    dq_in = ["q", "s"]
    if zero_point is not None:
        inits.append(helper.make_tensor("zp", x_type, list(scale_dims), [zero_point] * int(np.prod(scale_dims))))
        dq_in.append("zp")
    kw = {"block_size": x_dims[axis] // scale_dims[axis]} if len(scale_dims) == len(x_dims) else {}
    node = helper.make_node("DequantizeLinear", dq_in, ["w"], name="dq", axis=axis, **kw)
    out = helper.make_tensor_value_info("w", TensorProto.FLOAT16, list(x_dims))
    return helper.make_model(helper.make_graph([node], "g", inputs, [out], inits), opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("kw, message", [
    ({}, None),
    ({"x_dims": (128, 8), "scale_dims": (1, 8), "axis": 0}, None),  # the dense graphs' [in, out] blocked along in
    ({"x_type": onnx.TensorProto.UINT4}, "only allows FP8, INT8, and INT4"),  # QMoE's stored uint4 as it is
    ({"x_type": onnx.TensorProto.UINT8}, "only allows FP8, INT8, and INT4"),
    ({"x_const": False}, "INT4 is weight-only"),
    ({"x_dims": (4, 8, 128), "scale_dims": (4, 8, 1), "axis": 2}, "block quantization is 2-D INT4 only"),  # stacked experts
    ({"zero_point": 1}, "symmetric quantization"),
    ({"x_dims": (8, 127), "scale_dims": (8, 1)}, "odd last dimension"),
])
def test_fake_parser_dequantize_rules(kw, message):
    errors = trt_fake.ParserRules(_dq_graph(**kw)).errors
    assert (not errors) if message is None else (len(errors) == 1 and message in errors[0])


def test_fake_parser_refuses_unsorted_topk_and_unknown_ops():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=0),
             helper.make_node("QMoE", ["x"], ["y"], name="moe", domain="com.microsoft")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("v", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, [k]))
    errors = trt_fake.ParserRules(model).errors
    assert len(errors) == 2 and "sorted must be 1" in errors[0] and "No importer registered for op: QMoE" in errors[1]
