"""The MoE block's graph (com.microsoft QMoE over the stacked uint4 experts) against PyTorch computing
every expert with the same int4 weights, weighted by the router's weights: group-limited routing and a
routed_scaling_factor pass through exactly, for decode and prefill, batch 1 and 2."""

import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

GROUP = 32
H, INTER = 64, 32


def routing_shape(**over):
    from edge_sdk.converters.deepseek_v2 import check_config
    from edge_sdk.converters.tiny import tiny_config
    from edge_sdk.modelspec import shape_from_config

    cfg = tiny_config("deepseek_v2", 1024, **over)
    s = shape_from_config(cfg)
    return s, check_config(cfg, s)


def block(s, r, experts, shared, router_w):
    from torch import nn

    from edge_sdk.converters.decoder import Linear
    from edge_sdk.converters.mla import DenseMLP, MoE, Router

    def mlp(d):
        return DenseMLP({p: Linear(d[p].dequantize().t().contiguous(), None) for p in ("gate_proj", "up_proj", "down_proj")})

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MoE(Router(router_w.clone(), s, r), [mlp(e) for e in experts], mlp(shared))

        def forward(self, x):
            return self.mlp(x)

    return Wrap().eval()


def dense_reference(m, experts, x):
    """Every routed expert computed, weighted by the router's weights (0 outside the top-k), plus the shared ones."""
    with torch.no_grad():
        w = m.mlp.gate(x)
        out = m.mlp.shared_experts(x)
        for e, d in enumerate(experts):
            g, u, dn = (d[p].dequantize() for p in ("gate_proj", "up_proj", "down_proj"))
            out = out + (torch.nn.functional.silu(x @ g.t()) * (x @ u.t())) @ dn.t() * w[..., e:e + 1]
    return out.numpy()


def graph(tmp_path, m, s, experts, shared, router_w):
    from types import SimpleNamespace

    from edge_sdk.converters import onnx_export
    from edge_sdk.converters.deepseek_v2 import interleaved, pack_uint4_chunks
    from edge_sdk.converters.quant import pack_int4_chunks
    from edge_sdk.converters.streaming import StreamWriter

    w, groups = StreamWriter(tmp_path / "moe.weights"), {}
    w.add("mlp.gate.weight", "float16", tuple(router_w.shape), [router_w.half().numpy().tobytes()])
    for p, ql in shared.items():
        w.add(f"mlp.shared_experts.{p}.qweight", "int4", tuple(ql.q.t().shape), pack_int4_chunks(ql.q.t()))
        w.add(f"mlp.shared_experts.{p}.scales", "float16", tuple(ql.scales.t().shape), [ql.scales.t().contiguous().numpy().tobytes()])
        groups[f"mlp.shared_experts.{p}"] = SimpleNamespace(group_size=GROUP)
    for name, qls in (("gate_up_proj", [interleaved(e["gate_proj"], e["up_proj"]) for e in experts]),
                      ("down_proj", [e["down_proj"] for e in experts])):
        q, sc = torch.stack([ql.q for ql in qls]), torch.stack([ql.scales for ql in qls])
        w.add(f"mlp.experts.{name}.qweight", "uint8", (*q.shape[:2], q.shape[2] // 2), pack_uint4_chunks(q))
        w.add(f"mlp.experts.{name}.scales", "float16", tuple(sc.shape), [sc.numpy().tobytes()])
        groups[f"mlp.experts.{name}"] = SimpleNamespace(group_size=GROUP, stacked=True)
    wsec = w.close()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(1, 3, H),), buf, input_names=["x"], output_names=["logits"], opset_version=18,
                          dynamic_axes={"x": {0: "b", 1: "t"}, "logits": {0: "b", 1: "t"}}, dynamo=False, do_constant_folding=True)
    model = onnx_export.rewrite(onnx.load_from_string(buf.getvalue()), groups, {"mlp.gate.weight"}, "float32", wsec, wsec["file"], H)
    onnx_export.save(model, tmp_path / "moe.onnx")
    return model


@pytest.mark.parametrize("over", [
    {},
    {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
], ids=["greedy", "group-limited-scaled"])
def test_qmoe_graph_equals_every_expert_weighted(tmp_path, over):
    from edge_sdk.converters.quant import rtn

    s, r = routing_shape(n_routed_experts=8, num_experts_per_tok=3, **over)
    g = torch.Generator().manual_seed(0)

    def rand(o, i):
        return rtn(torch.randn(o, i, generator=g) / i ** 0.5, GROUP)

    experts = [{"gate_proj": rand(INTER, H), "up_proj": rand(INTER, H), "down_proj": rand(H, INTER)} for _ in range(8)]
    shared = {"gate_proj": rand(INTER, H), "up_proj": rand(INTER, H), "down_proj": rand(H, INTER)}
    router_w = (torch.randn(H, 8, generator=g) * 2).half().float()  # as the bundle stores it
    m = block(s, r, experts, shared, router_w)
    model = graph(tmp_path, m, s, experts, shared, router_w)
    assert [n.op_type for n in model.graph.node if "experts" in "".join(n.input)].count("QMoE") == 1
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # the shared experts' MatMulNBits in fp32
    sess = ort.InferenceSession(str(tmp_path / "moe.onnx"), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for b, t in ((1, 1), (2, 1), (2, 5)):
        x = rng.standard_normal((b, t, H), dtype=np.float32)
        ref = dense_reference(m, experts, torch.from_numpy(x))
        with torch.no_grad():
            torch_out = m(torch.from_numpy(x)).numpy()  # the module's own (top-k only) forward
        got = sess.run(None, {"x": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(torch_out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
