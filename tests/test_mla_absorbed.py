"""MLA in the absorbed form (converters/mla_absorbed.py) against the expanded form (converters/mla.py):
same logits and same cache in PyTorch (batch 2, left padding, several past lengths, with and without
q_lora_rank) and, converted through the real pipeline, the same logits and cache on onnxruntime from
the same weights file, byte for byte."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import edge_sdk  # noqa: E402
from edge_sdk.converters import mla  # noqa: E402
from edge_sdk.converters.deepseek_v2 import routing  # noqa: E402
from edge_sdk.converters.mla_absorbed import AbsorbedMLAttention, absorb  # noqa: E402
from edge_sdk.converters.tiny import tiny_config  # noqa: E402
from edge_sdk.modelspec import shape_from_config  # noqa: E402

ATOL = 1e-4  # fp32, only the summation order differs
CONVERT = dict(method="rtn", nsamples=4, seqlen=64, progress=False)


def decoders(q_lora_rank):
    """(expanded, absorbed) MLADecoder on the same random weights: tiny V2 MLA dims, small hidden / vocab."""
    cfg = tiny_config("deepseek_v2", 1024, q_lora_rank=q_lora_rank)
    small, w = mla.stub_weights(shape_from_config(cfg))
    w = {k: v * 0.2 if k.endswith("_proj.weight") or k.endswith("_mqa.weight") else v for k, v in w.items()}
    inv_freq, rope_scale = mla.rope_tables(cfg)
    scale = mla.attention_scale(cfg, small)

    def build():  # the expanded form (the converter builds the absorbed one)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mla.MLADecoder, "attention_class", staticmethod(lambda: mla.MLAttention))
            return mla.MLADecoder(small, w, routing(cfg), inv_freq, rope_scale, scale).eval()
    return build(), absorb(build())


def run_steps(model, prompt_len, steps, seed=0):
    """Left-padded batch of two: prefill `prompt_len` tokens, then `steps` single-token decode steps,
    -> the (logits, *present) of every call."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.s.vocab_size, (2, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : prompt_len // 3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    past, outs = model.empty_past(2), []
    for _ in range(steps + 1):
        with torch.no_grad():
            out = model(ids, mask, pos, *past)
        outs.append(out)
        past = list(out[1:])
        ids = torch.randint(0, model.s.vocab_size, (2, 1), generator=g)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        pos = pos[:, -1:] + 1
    return outs, mask


def test_absorb_replaces_every_attention_and_keeps_its_modules():
    expanded, absorbed = decoders(None)
    for a, b in zip(expanded.model.layers, absorbed.model.layers):
        assert type(b.self_attn) is AbsorbedMLAttention and type(a.self_attn) is mla.MLAttention
        assert dict(a.self_attn.named_parameters()).keys() == dict(b.self_attn.named_parameters()).keys()


@pytest.mark.parametrize("q_lora_rank", [None, 32], ids=["q_proj", "q_lora"])
@pytest.mark.parametrize("prompt_len, steps", [(1, 3), (7, 2), (40, 3)])
def test_torch_logits_and_cache_equal_expanded(q_lora_rank, prompt_len, steps):
    expanded, absorbed = decoders(q_lora_rank)
    ref, mask = run_steps(expanded, prompt_len, steps)
    got, _ = run_steps(absorbed, prompt_len, steps)
    assert ref[-1][1].shape[2] == prompt_len + steps  # the cache grew by one token per step
    # layer 0's first cache is computed before any attention: bit-identical; the rest carries rounding
    assert torch.equal(got[0][1], ref[0][1]) and torch.equal(got[0][2], ref[0][2])
    for r, o in zip(ref, got):
        valid = mask[:, -r[0].shape[1]:].bool()
        assert r[0].abs().max() > 1e-2  # the comparison is not between zeros
        torch.testing.assert_close(o[0][valid], r[0][valid], rtol=0, atol=ATOL)
        for rc, oc in zip(r[1:], o[1:]):
            torch.testing.assert_close(oc, rc, rtol=0, atol=ATOL)


def test_differs_from_expanded_when_the_value_half_is_wrong():
    """The comparison above can fail: W_UV taken from the key half changes the logits."""
    expanded, absorbed = decoders(None)
    for layer in absorbed.model.layers:
        attn = layer.self_attn
        attn.absorbed_weights = lambda q, a=attn: (AbsorbedMLAttention.absorbed_weights(a, q)[0],
                                                   AbsorbedMLAttention.absorbed_weights(a, q)[0].transpose(1, 2))
    ref, _ = run_steps(expanded, 7, 0)
    got, _ = run_steps(absorbed, 7, 0)
    assert (got[0][0] - ref[0][0]).abs().max() > 100 * ATOL


# ---- through the real pipeline: same weights file, same logits and cache on onnxruntime ------------

@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from edge_sdk.converters.tiny import build_model_dir

    root = tmp_path_factory.mktemp("mla-absorbed")
    model_dir = build_model_dir(root / "model", "deepseek_v2", seed=0)
    assert mla.MLADecoder.attention_class() is AbsorbedMLAttention  # what the converter builds
    edge_sdk.convert(model_dir, root / "absorbed", **CONVERT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mla.MLADecoder, "attention_class", staticmethod(lambda: mla.MLAttention))  # the only change
        edge_sdk.convert(model_dir, root / "expanded", **CONVERT)
    return root / "expanded", root / "absorbed"


def test_weights_file_and_manifest_weights_unchanged(bundles):
    a, b = bundles
    assert (a / "model.weights").read_bytes() == (b / "model.weights").read_bytes()
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in bundles)
    assert ma["weights"] == mb["weights"] and ma["io"] == mb["io"]


def test_absorbed_graph_has_no_expansion_of_the_cache(bundles):
    import onnx

    for d, n in zip(bundles, (1, 0)):
        g = onnx.load(d / "model.onnx", load_external_data=False).graph
        # expanded: kv_b_proj's dequantized weight feeds one MatMul per layer; absorbed: a Reshape, then W_UK / W_UV
        users = [x.op_type for x in g.node if "/model/layers.0/self_attn/kv_b_proj/DequantizeLinear/output_0" in x.input]
        assert users.count("MatMul") == n and users.count("Reshape") == 1 - n, users


def onnx_steps(path, prompt_len, steps, seed=1):
    from edge_sdk.converters.accuracy import ort_session

    sess = ort_session(path)
    names = [i.name for i in sess.get_inputs()]
    half = next(i for i in sess.get_inputs() if i.name.startswith("past")).shape[3]
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 1000, (2, prompt_len))
    mask = np.ones_like(ids)
    mask[1, : prompt_len // 3] = 0
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    past = [np.zeros((2, 1, 0, half), np.float32) for _ in names[3:]]
    outs = []
    for _ in range(steps + 1):
        out = sess.run(None, dict(zip(names, [ids, mask, pos, *past])))
        outs.append((out, mask.copy()))
        past = out[1:]
        ids = rng.integers(0, 1000, (2, 1))
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
    return outs


@pytest.mark.parametrize("prompt_len, steps", [(1, 2), (9, 3)])
def test_onnx_logits_and_cache_equal_expanded(bundles, prompt_len, steps):
    ref = onnx_steps(bundles[0] / "model.onnx", prompt_len, steps)
    got = onnx_steps(bundles[1] / "model.onnx", prompt_len, steps)
    np.testing.assert_array_equal(got[0][0][1], ref[0][0][1])  # layer 0's first cache: same ops, same bits
    for (r, mask), (o, _) in zip(ref, got):
        valid = mask[:, -r[0].shape[1]:].astype(bool)
        assert np.abs(r[0]).max() > 1e-2
        np.testing.assert_allclose(o[0][valid], r[0][valid], rtol=0, atol=ATOL)
        for rc, oc in zip(r[1:], o[1:]):
            np.testing.assert_allclose(oc, rc, rtol=0, atol=ATOL)
