"""ONNX vs PyTorch one piece at a time, for models too large for the whole-graph check.

The exported graph is cut with onnx's own Extractor into the head (embedding lookup, rotary tables,
attention mask), one graph per decoder layer (residual in -> residual out and present KV) and the
tail (final norm, lm_head). Each piece runs in onnxruntime, reading its weights from the bundle's
weights file, on the activations the streamed PyTorch model computes for the same input; so memory
stays at one layer and a difference is attributed to the piece that made it. The input is the
whole-graph check's: a batch of two calibration windows of 16 tokens, the second left-padded, then
one decode step with the KV cache.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from edge_sdk.errors import ConversionError

from .accuracy import LOGIT_ATOL, ort_session

LAYER_NODE = re.compile(r"^/model/layers[./](\d+)/")


class GraphPieces:
    """Tensor names at the cuts of an exported decoder graph."""

    def __init__(self, model):
        g = model.graph
        inits = {t.name for t in g.initializer}
        producer = {o: n for n in g.node for o in n.output}
        by_layer: dict[int, list] = {}
        for n in g.node:
            m = LAYER_NODE.match(n.name)
            if m:
                by_layer.setdefault(int(m.group(1)), []).append(n)
        self.num_layers = len(by_layer)
        self.graph_inputs = [i.name for i in g.input]

        def outside(i: int) -> list[str]:
            own = {o for n in by_layer[i] for o in n.output}
            return sorted({x for n in by_layer[i] for x in n.input if x and x not in own and x not in inits
                           and not (x in producer and producer[x].op_type == "Constant")})

        past = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
        ext = [[x for x in outside(i) if not past.match(x)] for i in range(self.num_layers)]
        # shared: what every layer reads (rotary tables, mask); the residual: the one other input
        shared = set.intersection(*map(set, ext)) if self.num_layers > 1 else \
            {x for x in ext[0] if not (x in producer and producer[x].op_type == "Gather")}
        self.shared, self.residual_in = sorted(shared), []
        for i, e in enumerate(ext):
            res = [x for x in e if x not in shared]
            if len(res) != 1:
                raise ConversionError(f"decoder layer {i} of the exported graph takes {len(res)} residual inputs, expected 1",
                                      hint="this is a converter bug: report it with the model's config.json")
            self.residual_in.append(res[0])
        consumers = {x for n in g.node if not LAYER_NODE.match(n.name) for x in n.input}
        last_own = {o for n in by_layer[self.num_layers - 1] for o in n.output}
        (self.residual_out,) = sorted(last_own & consumers)

    def layer_io(self, i: int) -> tuple[list[str], list[str]]:
        nxt = self.residual_in[i + 1] if i + 1 < self.num_layers else self.residual_out
        return ([self.residual_in[i], *self.shared, f"past_key_values.{i}.key", f"past_key_values.{i}.value"],
                [nxt, f"present.{i}.key", f"present.{i}.value"])


def _feeds(names, values) -> dict:
    return {n: (v.numpy() if isinstance(v, torch.Tensor) else v) for n, v in zip(names, values)}


def torch_head(model, ids, mask, pos):
    """Decoder.forward's preamble, streamed: (embedding rows, cos, sin, mask)."""
    t, total = ids.shape[1], mask.shape[1]
    freqs = pos.float().unsqueeze(-1) * model.inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = (emb.cos() * model.rope_scale).to(torch.float32).unsqueeze(1)
    sin = (emb.sin() * model.rope_scale).to(torch.float32).unsqueeze(1)
    q_pos = torch.arange(t).unsqueeze(-1) + (total - t)
    k_pos = torch.arange(total).unsqueeze(0)
    allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0) & mask.bool().unsqueeze(1).unsqueeze(1)
    return model.embed(ids), cos, sin, torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


class _Worst:
    def __init__(self):
        self.by_piece: dict[str, float] = {}

    def compare(self, piece: str, ref: torch.Tensor, got: np.ndarray, valid: torch.Tensor | None = None) -> None:
        r, o = ref.float().numpy(), got.astype(np.float32)
        if r.shape != o.shape:
            raise ConversionError(f"exported graph, {piece}: output shape {list(o.shape)}, PyTorch gives {list(r.shape)}",
                                  hint="this is a converter bug: report it with the model's config.json")
        d = np.abs(r - o)
        if valid is not None:  # [B, T] rows of real tokens
            d, r = d[valid.numpy()], r[valid.numpy()]
        worst, limit = float(d.max(initial=0.0)), LOGIT_ATOL * max(1.0, float(np.abs(r).max(initial=0.0)))
        self.by_piece[piece] = max(self.by_piece.get(piece, 0.0), worst)
        if not worst <= limit:
            raise ConversionError(f"exported graph disagrees with the PyTorch model in {piece}: max |diff| {worst:.2e} "
                                  f"(limit {limit:.2e})", hint="this is a converter bug: report it with the model's config.json")


def check_layers(graph_path: Path, model, shape, calib_ids: list[list[int]], *, seed: int = 0) -> dict:
    """Head, every decoder layer and tail of `graph_path` against the streamed PyTorch `model`
    (streamed_eval.StreamedModel of kind "quant"); raises ConversionError naming the piece that differs."""
    import onnx
    from onnx.utils import Extractor

    proto = onnx.load(str(graph_path), load_external_data=False)
    pieces = GraphPieces(proto)
    known = {v.name for v in (*proto.graph.value_info, *proto.graph.input, *proto.graph.output)}
    for name in {*pieces.residual_in, *pieces.shared, pieces.residual_out} - known:  # the fp32 graph's activations
        proto.graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    ex = Extractor(proto)
    piece_path = graph_path.with_name(".check-piece.onnx")  # beside the weights file its initializers point into

    def run(inputs, outputs, feeds):
        onnx.save(ex.extract_model(inputs, outputs), str(piece_path))
        try:
            return ort_session(piece_path).run(None, _feeds(inputs, feeds))
        finally:
            piece_path.unlink(missing_ok=True)

    g = torch.Generator().manual_seed(seed)
    n = min(16, len(calib_ids[0]))
    ids = torch.tensor([calib_ids[0][:n], calib_ids[-1][:n]], dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, : n // 4] = 0
    ids[1, : n // 4] = int(torch.randint(0, shape.vocab_size, (1,), generator=g))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    # a model may bring its own head inputs and cache dims (MLA: deepseek_v2_streamed.MLAStreamedModel)
    head_inputs = getattr(model, "head_inputs", None) or (lambda *a: torch_head(model, *a))
    kv_dims = getattr(model, "cache_dims", (shape.num_kv_heads, shape.head_dim))
    empty = torch.zeros(2, kv_dims[0], 0, kv_dims[1])
    worst = _Worst()
    # steps: prefill, then one decode token; each step's head inputs
    steps = [(ids, mask, pos)]
    nxt = ids[:, -1:].flip(0)  # any token ids will do: both sides get the same
    steps.append((nxt, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), pos[:, -1:] + 1))
    xs, heads_o, heads_t = [], [], []
    head_in = ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value"]
    for k, (i_, m_, p_) in enumerate(steps):
        past = torch.zeros(2, kv_dims[0], 0 if k == 0 else n, kv_dims[1])
        out = run(head_in, [pieces.residual_in[0], *pieces.shared], [i_, m_, p_, past, past])
        t = head_inputs(i_, m_, p_)
        worst.compare("the head (embedding rows)", t[0], out[0])
        xs.append(t[0])
        heads_t.append(t[1:])
        heads_o.append(out[1:])
    valid = [mask.bool(), torch.ones(2, 1, dtype=torch.bool)]
    with torch.no_grad():
        for i in range(shape.num_layers):
            layer = model.layer(i)
            inputs, outputs = pieces.layer_io(i)
            ref_kv = None
            for k in range(2):
                pk, pv = (empty, empty) if k == 0 else ref_kv
                cos, sin, m = heads_t[k]
                y, kk, vv = layer(xs[k], cos, sin, m, pk, pv)
                got = run(inputs, outputs, [xs[k], *heads_o[k], pk, pv])
                worst.compare(f"decoder layer {i}", y, got[0], valid[k])
                worst.compare(f"decoder layer {i} (KV cache)", torch.cat([kk, vv]), np.concatenate(got[1:]))
                xs[k], ref_kv = y, (kk, vv)
            del layer
    for k in range(2):
        ref = model.head(xs[k])
        got = run([pieces.residual_out], ["logits"], [xs[k]])[0]
        worst.compare("the tail (final norm, lm_head)", ref, got, valid[k])
        last, other = ref[:, -1], torch.from_numpy(got[:, -1]).argmax(-1)
        # a different argmax only counts when it is not a tie within the logit tolerance
        if not bool((last.gather(-1, other.unsqueeze(-1)).squeeze(-1) >= last.max(-1).values - LOGIT_ATOL).all()):
            raise ConversionError(f"exported graph disagrees with the PyTorch model: greedy tokens {other.tolist()} vs "
                                  f"{last.argmax(-1).tolist()}", hint="this is a converter bug: report it with the model's config.json")
    diffs = worst.by_piece
    return {"per_piece": True, "pieces": 2 + shape.num_layers, "decode_steps": 1,
            "max_abs_logit_diff": diffs["the tail (final norm, lm_head)"],
            "max_abs_layer_diff": max(v for p, v in diffs.items() if p.startswith("decoder layer")),
            "max_abs_head_diff": diffs["the head (embedding rows)"], "greedy_tokens_equal": True}
