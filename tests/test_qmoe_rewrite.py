"""onnx_export.rewrite pointing a QMoE node at a layer's stacked experts: a weights section whose
expert shapes disagree with each other or with QMoE's layout (fc1 [E, 2I, H], fc2 [E, H, I] as uint4
bytes [E, out, in / 2] and fp16 scales [E, out, in / g], one block size) is refused with one line
before a graph is written that onnxruntime would reject or compute wrongly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from edge_sdk.errors import ConversionError  # noqa: E402

P = "model.layers.1.mlp.experts"
E, H, INTER, G = 4, 256, 128, 64


def _graph():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, H])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, E])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 8])
    inits = [helper.make_tensor(f"{P}.gate_up_proj.weight", TensorProto.FLOAT, [E, 2, 2], [0.0] * (E * 4)),
             helper.make_tensor(f"{P}.down_proj.weight", TensorProto.FLOAT, [E, 2, 1], [0.0] * (E * 2))]
    node = helper.make_node("QMoE", ["x", "w", f"{P}.gate_up_proj.weight", "", "", f"{P}.down_proj.weight",
                                     "", "", "", "", "", "", "", "", "w"], ["logits"], name="/layers.1/mlp/QMoE",
                            domain="com.microsoft", k=2)
    return helper.make_model(helper.make_graph([node], "g", [x, w], [y], inits))


def _section(**over):
    shapes = {f"{P}.gate_up_proj.qweight": ("uint8", [E, 2 * INTER, H // 2]), f"{P}.gate_up_proj.scales": ("float16", [E, 2 * INTER, H // G]),
              f"{P}.down_proj.qweight": ("uint8", [E, H, INTER // 2]), f"{P}.down_proj.scales": ("float16", [E, H, INTER // G])}
    shapes |= over
    tensors, offset = {}, 0
    for name, (dtype, shape) in shapes.items():
        n = 1
        for d in shape:
            n *= d
        nbytes = n * (2 if dtype == "float16" else 1)
        tensors[name] = {"dtype": dtype, "shape": shape, "offset": offset, "nbytes": nbytes}
        offset += nbytes
    return {"file": "model.weights", "tensors": tensors}


def _rewrite(section, groups=(G, G)):
    from edge_sdk.converters import onnx_export

    quantized = {f"{P}.gate_up_proj": SimpleNamespace(group_size=groups[0], stacked=True),
                 f"{P}.down_proj": SimpleNamespace(group_size=groups[1], stacked=True)}
    return onnx_export.rewrite(_graph(), quantized, set(), "float32", section, "model.weights", 8)


def test_agreeing_experts_are_pointed_at():
    node = next(n for n in _rewrite(_section()).graph.node if n.op_type == "QMoE")
    assert (node.input[2], node.input[5]) == (f"{P}.gate_up_proj.qweight", f"{P}.down_proj.qweight")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["block_size"] == G


@pytest.mark.parametrize("over, groups, says", [
    ({f"{P}.down_proj.qweight": ("uint8", [E + 1, H, INTER // 2])}, (G, G), "experts"),  # expert counts differ
    ({f"{P}.down_proj.qweight": ("uint8", [E, H // 2, INTER // 2])}, (G, G), "down_proj"),  # hidden sizes differ
    ({f"{P}.gate_up_proj.qweight": ("uint8", [E, INTER, H // 2])}, (G, G), "gate_up_proj"),  # not 2 x down's input
    ({f"{P}.gate_up_proj.scales": ("float16", [E, 2 * INTER, H // 32])}, (G, G), "scales"),  # scales not in / g
    ({f"{P}.down_proj.qweight": ("uint8", [E, H])}, (G, G), "down_proj"),  # not 3-D
    ({f"{P}.down_proj.scales": ("float16", [E, H, INTER // (2 * G)])}, (G, 2 * G), "block size"),  # QMoE takes one block_size
])
def test_disagreeing_expert_shapes_are_one_line(over, groups, says):
    with pytest.raises(ConversionError, match=says) as e:
        _rewrite(_section(**over), groups)
    assert "\n" not in str(e.value) and e.value.hint


def test_experts_missing_from_the_section_are_one_line():
    section = _section()
    del section["tensors"][f"{P}.down_proj.scales"]
    with pytest.raises(ConversionError, match="down_proj.scales") as e:
        _rewrite(section)
    assert "\n" not in str(e.value)
