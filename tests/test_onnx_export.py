"""The exported graph: pinned IR/opset, int4 DequantizeLinear feeding MatMul, stable names, aligned
external weights, and logits equal to an independent transformers model holding the bundle's weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from edge_sdk.converters.accuracy import ort_session  # noqa: E402
from edge_sdk.converters.bundle_weights import dequantized_state_dict  # noqa: E402

ARCHS = ["qwen2", "llama"]


def manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory, tiny_model_dir):
    from edge_sdk.converters import convert

    out = tmp_path_factory.mktemp("fp16") / "b"
    convert(tiny_model_dir("qwen2"), out, method="rtn", nsamples=2, seqlen=32, eval_tokens=64, graphs=("fp32", "fp16"))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_pins_ir_10_and_opset_21(tiny_bundle, arch):
    m = onnx.load(str(tiny_bundle(arch) / "model.onnx"), load_external_data=False)
    assert m.ir_version == 10
    assert {o.domain: o.version for o in m.opset_import} == {"": 21}
    onnx.checker.check_model(str(tiny_bundle(arch) / "model.onnx"), full_check=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_dequantize_feeds_matmul_with_stable_names(tiny_bundle, arch):
    b = tiny_bundle(arch)
    m = onnx.load(str(b / "model.onnx"), load_external_data=False)
    nodes = {n.name: n for n in m.graph.node}
    inits = {t.name: t for t in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    layers = manifest(b)["architecture"]["num_layers"]
    for i in range(layers):
        for block, proj in [("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
                            ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]:
            mm = nodes[f"/model/layers.{i}/{block}/{proj}/MatMul"]
            dq = producers[mm.input[1]]
            assert dq.op_type == "DequantizeLinear"
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
            assert attrs == {"axis": 0, "block_size": 128}
            hf = f"model.layers.{i}.{'self_attn' if block == 'attn' else 'mlp'}.{proj}"
            q = inits[dq.input[0]]
            assert q.name == f"{hf}.qweight" and q.data_type == onnx.TensorProto.INT4
            assert len(dq.input) == 2  # no zero point: symmetric
            scale_src = producers.get(dq.input[1])
            scale_name = scale_src.input[0] if scale_src is not None else dq.input[1]
            assert scale_name == f"{hf}.scales" and inits[scale_name].data_type == onnx.TensorProto.FLOAT16
            assert list(inits[scale_name].dims) == [q.dims[0] // 128, q.dims[1]]
    assert producers[nodes["/lm_head/MatMul"].input[1]].op_type == "DequantizeLinear"


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_are_external_page_aligned_and_layers_contiguous(tiny_bundle, arch):
    b = tiny_bundle(arch)
    man = manifest(b)
    ws = man["weights"]
    m = onnx.load(str(b / "model.onnx"), load_external_data=False)
    external = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {t.name for t in external} == set(ws["tensors"])
    for t in external:
        ext = {e.key: e.value for e in t.external_data}
        meta = ws["tensors"][t.name]
        assert ext["location"] == "model.weights"
        assert int(ext["offset"]) == meta["offset"] and int(ext["offset"]) % 4096 == 0
        assert int(ext["length"]) == meta["nbytes"]
    size = (b / "model.weights").stat().st_size
    spans = ws["layers"]
    assert [s["index"] for s in spans] == list(range(man["architecture"]["num_layers"]))
    for s, nxt in zip(spans, spans[1:]):
        assert s["offset"] % 4096 == 0 and s["offset"] + s["nbytes"] <= nxt["offset"]
    for name, meta in ws["tensors"].items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            assert spans[i]["offset"] <= meta["offset"] and meta["offset"] + meta["nbytes"] <= spans[i]["offset"] + spans[i]["nbytes"]
        assert meta["offset"] + meta["nbytes"] <= size


def hf_with_bundle_weights(model_dir, bundle):
    """A transformers model (independent of the exporter) loaded with the bundle's dequantized weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sd = {k: torch.from_numpy(v.copy()) for k, v in dequantized_state_dict(bundle, manifest(bundle)).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def feeds(ids, mask, pos, past):
    f = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i, (k, v) in enumerate(past):
        f[f"past_key_values.{i}.key"], f[f"past_key_values.{i}.value"] = k, v
    return f


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_matches_transformers_with_kv_cache_and_left_padding(tiny_bundle, tiny_model_dir, arch):
    b = tiny_bundle(arch)
    man = manifest(b)
    hf = hf_with_bundle_weights(tiny_model_dir(arch), b)
    sess = ort_session(b / "model.onnx")
    kv = man["io"]["kv"]
    rng = np.random.default_rng(0)
    ids = rng.integers(10, man["architecture"]["vocab_size"], size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    empty = np.zeros((2, kv["num_kv_heads"], 0, kv["head_dim"]), np.float32)
    out = sess.run(None, feeds(ids, mask, pos, [(empty, empty)] * kv["num_layers"]))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos)).logits.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[0][valid], ref[valid], atol=2e-4, rtol=1e-4)
    # greedy decoding with the cache: 5 steps, tokens equal to transformers re-running the full prefix
    seq, m, p, past = ids, mask, pos, [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(kv["num_layers"])]
    nxt = out[0][:, -1].argmax(-1)
    for _ in range(5):
        seq = np.concatenate([seq, nxt[:, None]], 1)
        m = np.concatenate([m, np.ones((2, 1), np.int64)], 1)
        p = p[:, -1:] + 1
        o = sess.run(None, feeds(nxt[:, None], m, p, past))
        past = [(o[1 + 2 * i], o[2 + 2 * i]) for i in range(kv["num_layers"])]
        assert past[0][0].shape[2] == seq.shape[1]
        full_pos = np.clip(m.cumsum(-1) - 1, 0, None)
        with torch.no_grad():
            r = hf(input_ids=torch.from_numpy(seq), attention_mask=torch.from_numpy(m), position_ids=torch.from_numpy(full_pos)).logits[:, -1].numpy()
        np.testing.assert_allclose(o[0][:, -1], r, atol=2e-4, rtol=1e-4)
        nxt = o[0][:, -1].argmax(-1)
        assert (nxt == r.argmax(-1)).all()


def test_fp16_graph_shares_weights_and_tracks_fp32(fp16_bundle):
    man = manifest(fp16_bundle)
    assert man["graphs"]["fp16"] == {"file": "model.fp16.onnx", "activation_dtype": "float16"}
    g16 = onnx.load(str(fp16_bundle / "model.fp16.onnx"), load_external_data=False)
    g32 = onnx.load(str(fp16_bundle / "model.onnx"), load_external_data=False)
    assert g16.ir_version == 10 and g16.opset_import[0].version == 21
    ext = lambda g: {t.name: {e.key: e.value for e in t.external_data} for t in g.graph.initializer if t.external_data}  # noqa: E731
    assert ext(g16) == ext(g32)
    kv = man["io"]["kv"]
    ids = np.array([[5, 9, 33, 70, 2, 11]])
    mask, pos = np.ones_like(ids), np.arange(6)[None]
    e32 = np.zeros((1, kv["num_kv_heads"], 0, kv["head_dim"]), np.float32)
    o32 = ort_session(fp16_bundle / "model.onnx").run(None, feeds(ids, mask, pos, [(e32, e32)] * kv["num_layers"]))
    o16 = ort_session(fp16_bundle / "model.fp16.onnx").run(None, feeds(ids, mask, pos, [(e32.astype(np.float16),) * 2] * kv["num_layers"]))
    assert o16[0].dtype == np.float32 and o16[1].dtype == np.float16
    np.testing.assert_allclose(o16[0], o32[0], atol=0.05)


def test_in_pipeline_check_passes_on_bundle_weights_and_catches_a_wrong_graph(tiny_bundle):
    from edge_sdk.converters.accuracy import check_onnx
    from edge_sdk.converters.archs import arch_for
    from edge_sdk.converters.decoder import Decoder, rope_tables
    from edge_sdk.modelspec import shape_from_config
    from edge_sdk.errors import ConversionError

    b = tiny_bundle("llama")
    man = manifest(b)
    cfg, arch = man["source"]["config"], arch_for(man["source"]["config"])
    shape = shape_from_config(cfg)
    inv_freq, scale = rope_tables(cfg, arch)
    weights = {k: torch.from_numpy(v.copy()) for k, v in dequantized_state_dict(b, man).items()}
    calib = [[5, 17, 99, 3, 250, 7, 8, 12, 40, 41, 42, 43, 44, 45, 46, 47]] * 2
    ok = check_onnx(b / "model.onnx", Decoder(shape, weights, arch, inv_freq, scale).eval(), shape, calib)
    assert ok["greedy_tokens_equal"] and ok["max_abs_logit_diff"] < 1e-4
    weights["model.layers.1.post_attention_layernorm.weight"] = weights["model.layers.1.post_attention_layernorm.weight"] * 1.01
    with pytest.raises(ConversionError, match="disagrees with the PyTorch model"):
        check_onnx(b / "model.onnx", Decoder(shape, weights, arch, inv_freq, scale).eval(), shape, calib)
