"""GPTQ through GPTQModel beats round-to-nearest; GPTQ checkpoints import exactly (v1 and v2) or are
refused with a reason (asymmetric, desc_act permutations)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gptqmodel")

from edge_sdk.converters import calibration  # noqa: E402
from edge_sdk.converters.archs import linear_names  # noqa: E402
from edge_sdk.converters.checkpoint import load_weights, open_checkpoint  # noqa: E402
from edge_sdk.converters.gptq import gptq_quantize  # noqa: E402
from edge_sdk.converters.gptq_import import unpack_cols, unpack_rows  # noqa: E402
from edge_sdk.converters.options import ConvertOptions  # noqa: E402
from edge_sdk.converters.quant import QuantizedLinear, pack_int4, rtn  # noqa: E402
from edge_sdk.errors import ConversionError  # noqa: E402


def calib_windows(model_dir, nsamples=8, seqlen=128):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokens, _ = calibration.split_default(calibration.tokenize(tok, calibration.default_text()))
    return calibration.windows(tokens, nsamples, seqlen, bos=0)


def linear_inputs(model_dir, calib) -> dict[str, torch.Tensor]:
    """Inputs of every decoder linear of the float model on the calibration windows: {name: [N, in]}."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for ids in calib.ids:
            hf(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_gptq_layer_output_error_below_round_to_nearest(tiny_model_dir, arch):
    d = tiny_model_dir(arch)
    ck = open_checkpoint(d)
    calib = calib_windows(d)
    names = linear_names(2, ck.arch)
    gptq, info = gptq_quantize(ck, calib, ConvertOptions(nsamples=8, seqlen=128), names)
    assert info["method"] == "gptq"
    w = load_weights(ck)
    x = linear_inputs(d, calib)
    err = {}
    for n in names:
        ref = x[n] @ w[f"{n}.weight"].T
        err[n] = tuple(float(((x[n] @ q.dequantize().T) - ref).pow(2).sum()) for q in (gptq[n], rtn(w[f"{n}.weight"], 128)))
        gptq[n].check()
    # layer 0 sees exactly the float inputs GPTQ calibrated on: every linear must beat RTN there
    for n in names[:7]:
        assert err[n][0] < err[n][1], (n, err[n])
    assert sum(e[0] for e in err.values()) < 0.8 * sum(e[1] for e in err.values())


def test_int4_packing_matches_onnx_reader():
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    q = torch.randint(-8, 8, (6, 10), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    t = onnx.TensorProto(name="q", data_type=onnx.TensorProto.INT4, dims=[6, 10], raw_data=pack_int4(q))
    np.testing.assert_array_equal(numpy_helper.to_array(t), q.numpy())


def test_int4_packing_in_row_pieces_of_a_transposed_view_gives_the_same_bytes():
    from edge_sdk.converters.quant import pack_int4_chunks

    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    g = torch.Generator().manual_seed(2)
    for out, inp, rows in [(1, 1, 1), (3, 5, 1), (7, 3, 2), (9, 64, 3), (8, 7, 4), (5, 9, 2048)]:
        q = torch.randint(-8, 8, (out, inp), generator=g, dtype=torch.int8)
        raw = b"".join(pack_int4_chunks(q.t(), rows))
        t = onnx.TensorProto(name="q", data_type=onnx.TensorProto.INT4, dims=[inp, out], raw_data=raw)
        np.testing.assert_array_equal(numpy_helper.to_array(t), q.t().numpy())


def test_gptq_unpack_layout():
    vals = torch.arange(16, dtype=torch.int32).reshape(16, 1) % 16  # input channel i holds value i
    packed = torch.zeros(2, 1, dtype=torch.int32)
    for i in range(16):
        packed[i // 8, 0] |= int(vals[i, 0]) << (4 * (i % 8))
    assert unpack_rows(packed)[:, 0].tolist() == list(range(16))
    assert unpack_cols(packed.T)[0].tolist() == list(range(16))


@pytest.fixture(scope="module")
def gptqmodel_checkpoint(tmp_path_factory, tiny_model_dir):
    """A checkpoint quantized and saved by GPTQModel itself (format gptq v1, symmetric, g128)."""
    from gptqmodel import GPTQModel, QuantizeConfig

    src = tiny_model_dir("qwen2")
    out = tmp_path_factory.mktemp("gptqmodel") / "qwen2-gptq"
    calib = calib_windows(src, 4, 64)
    qc = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False, act_group_aware=True, damp_percent=0.05)
    from edge_sdk.converters.gptq import _stats_in

    m = GPTQModel.load(str(src), qc, device="cpu", dtype=torch.float32)
    with _stats_in(out.parent / "stats"):  # GPTQModel's per-layer log, not logs/ in the working directory
        m.quantize([{"input_ids": torch.tensor([i]), "attention_mask": torch.ones(1, len(i), dtype=torch.long)} for i in calib.ids],
                   batch_size=1, calibration_sort=None)
    m.save(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    return out


def reference_dequant(sd, name):
    """Textbook GPTQ v1 dequantisation, written independently of the importer."""
    qw, qz, sc = sd[f"{name}.qweight"].numpy(), sd[f"{name}.qzeros"].numpy(), sd[f"{name}.scales"].float().numpy()
    in_f, out_f = qw.shape[0] * 8, qw.shape[1]
    w = np.zeros((out_f, in_f), np.float32)
    for i in range(in_f):
        q = (qw[i // 8] >> (4 * (i % 8))) & 0xF
        g = i // 128
        z = np.array([(qz[g, o // 8] >> (4 * (o % 8))) & 0xF for o in range(out_f)]) + 1
        w[:, i] = (q - z) * sc[g]
    return w


def test_import_checkpoint_saved_by_gptqmodel(gptqmodel_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from edge_sdk.bundle import verify_bundle
    from edge_sdk.converters import convert
    from edge_sdk.converters.bundle_weights import dequantized_state_dict

    out = tmp_path / "b"
    convert(gptqmodel_checkpoint, out, nsamples=2, seqlen=32, eval_tokens=64)
    man = verify_bundle(out)
    q = man["quantization"]
    assert q["imported"] is True and q["imported_format"] == "gptq" and q["calibration"] is None
    sd = load_file(gptqmodel_checkpoint / "model.safetensors")
    got = dequantized_state_dict(out, man)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        np.testing.assert_array_equal(got[f"{name}.weight"], reference_dequant(sd, name))
    assert man["accuracy"]["onnx_vs_torch"]["greedy_tokens_equal"]
    assert man["accuracy"]["reference"] == "dequantized GPTQ checkpoint"


def _rewrite(src, dst, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    edit(sd, cfg["quantization_config"])
    save_file(sd, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_gptq_v2_zero_points_import_to_the_same_weights(gptqmodel_checkpoint, tmp_path):
    from edge_sdk.converters.gptq_import import import_gptq

    def to_v2(sd, qc):
        for k in [k for k in sd if k.endswith(".qzeros")]:
            sd[k] = sd[k] + 0x11111111  # every nibble 7 -> 8 (v2 stores the zero itself)
        qc["checkpoint_format"] = "gptq_v2"

    v2 = _rewrite(gptqmodel_checkpoint, tmp_path / "v2", to_v2)
    opts = ConvertOptions(method="rtn")
    a = import_gptq(open_checkpoint(gptqmodel_checkpoint), _shape(gptqmodel_checkpoint), opts)
    b = import_gptq(open_checkpoint(v2), _shape(v2), opts)
    assert b.section["imported_format"] == "gptq_v2"
    for n, ql in a.quantized.items():
        assert torch.equal(ql.q, b.quantized[n].q) and torch.equal(ql.scales, b.quantized[n].scales)


def _shape(d):
    from edge_sdk.modelspec import shape_from_config

    ck = open_checkpoint(d)
    return shape_from_config(ck.config)


def test_asymmetric_checkpoint_is_refused(gptqmodel_checkpoint, tmp_path):
    from edge_sdk.converters import convert

    def asym(sd, qc):
        k = "model.layers.0.mlp.up_proj.qzeros"
        sd[k] = sd[k].clone()
        sd[k][0, 0] = 0x77777775  # one column with zero point 6
        qc["sym"] = False

    d = _rewrite(gptqmodel_checkpoint, tmp_path / "asym", asym)
    with pytest.raises(ConversionError, match="asymmetric.*up_proj|up_proj.*asymmetric") as e:
        convert(d, tmp_path / "out")
    assert "zero-point 0" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_desc_act_checkpoint_is_refused(gptqmodel_checkpoint, tmp_path):
    from edge_sdk.converters import convert

    def perm(sd, qc):
        k = "model.layers.1.self_attn.o_proj.g_idx"
        sd[k] = sd[k].flip(0).contiguous()
        qc["desc_act"] = True

    d = _rewrite(gptqmodel_checkpoint, tmp_path / "desc", perm)
    with pytest.raises(ConversionError, match="desc_act") as e:
        convert(d, tmp_path / "out")
    assert "o_proj" in str(e.value) and "act_group_aware" in str(e.value)


def test_rtn_in_row_chunks_gives_the_whole_matrix_integers():
    from edge_sdk.converters.quant import group_scales, quantize_with_scales

    g = torch.Generator().manual_seed(3)
    for rows, chunk in [(7, 300), (1, 1), (33, 2**24), (50, 3 * 256)]:
        w = torch.randn(rows, 256, generator=g).to(torch.bfloat16)
        scales = group_scales(w, 128)
        ql = rtn(w, 128, chunk_elements=chunk)
        assert torch.equal(ql.scales, scales) and torch.equal(ql.q, quantize_with_scales(w, scales, 128))


def test_rtn_roundtrip_is_within_half_a_step():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    ql: QuantizedLinear = rtn(w, 128)
    ql.check()
    step = ql.scales.float().repeat_interleave(128, dim=1)
    # the positive extreme sits at 7.5 steps and is clamped to 7; rounding the scale to fp16 (relative
    # error <= 2^-11) moves a value at most 7.5 * 2^-11 steps further
    assert ((ql.dequantize() - w).abs() <= step * (0.5 + 7.5 * 2**-11)).all()


def test_pad_token_for_gptqmodel_is_inside_the_vocabulary(tiny_model_dir, tmp_path):
    from edge_sdk.converters.gptq import gptq_source, pad_token_id
    from edge_sdk.converters.tiny import EOS, build_model_dir

    assert pad_token_id(open_checkpoint(tiny_model_dir("qwen2"))) is None  # its own pad token (id 2) is used
    nopad = open_checkpoint(build_model_dir(tmp_path / "nopad", "qwen2", pad_token=False))
    assert pad_token_id(nopad) == (1, EOS)
    view = gptq_source(nopad, tmp_path / "view")
    assert json.loads((view / "config.json").read_text())["pad_token_id"] == 1
    assert json.loads((view / "tokenizer_config.json").read_text())["pad_token"] == EOS
    assert "pad_token" not in json.loads((nopad.path / "tokenizer_config.json").read_text())  # the checkpoint is untouched
    cfg = json.loads((nopad.path / "config.json").read_text())
    (nopad.path / "config.json").write_text(json.dumps(cfg | {"pad_token_id": cfg["vocab_size"]}))
    assert pad_token_id(open_checkpoint(nopad.path)) == (1, EOS)  # a pad id past the vocabulary is replaced too


def test_checkpoint_without_pad_token_quantizes_like_one_with(tiny_model_dir, tmp_path):
    """Llama-3-style checkpoints name no pad token; GPTQModel used to die on them in nn.Embedding
    (padding_idx == vocab_size). The integers must equal those of the same weights with a pad token."""
    from edge_sdk.converters.tiny import build_model_dir

    nopad = build_model_dir(tmp_path / "nopad", "qwen2", seed=0, pad_token=False)
    calib, opts = calib_windows(nopad, nsamples=4, seqlen=64), ConvertOptions(nsamples=4, seqlen=64)
    names = linear_names(2, open_checkpoint(nopad).arch)
    got, _ = gptq_quantize(open_checkpoint(nopad), calib, opts, names)
    want, _ = gptq_quantize(open_checkpoint(tiny_model_dir("qwen2")), calib, opts, names)
    for n in names:
        assert torch.equal(got[n].q, want[n].q) and torch.equal(got[n].scales, want[n].scales), n


def test_gptqmodel_failure_is_one_line_naming_the_stage(tiny_model_dir, monkeypatch):
    import gptqmodel

    def broken(*a, **k):
        raise AssertionError("Padding_idx must be within num_embeddings\nsecond line")

    monkeypatch.setattr(gptqmodel.GPTQModel, "load", broken)
    ck = open_checkpoint(tiny_model_dir("qwen2"))
    with pytest.raises(ConversionError) as e:
        gptq_quantize(ck, calib_windows(tiny_model_dir("qwen2"), 2, 32), ConvertOptions(nsamples=2, seqlen=32), linear_names(2, ck.arch))
    assert "while loading" in str(e.value) and "AssertionError: Padding_idx must be within num_embeddings" in str(e.value)
    assert "\n" not in str(e.value) and "--method rtn" in str(e.value)
