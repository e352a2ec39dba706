"""Quantize a checkpoint one decoder layer at a time, each layer's result saved to the work directory.

GPTQ is GPTQModel's own per-module step (gptqmodel.quantization.gptq.GPTQ: add_batch, quantize),
driven the way GPTQModel's layer loop drives it, so the integers are the same:
  - layer inputs: the embedding rows of each calibration window (fp32), batch size 1, no attention
    mask (causal), position embeddings from the architecture's rotary class, the HF decoder layer
    in fp32 with sdpa attention;
  - four subsets in order (q/k/v, o, gate/up, down): forward every window through the layer with
    hooks feeding each subset module's input to its GPTQ task, quantize, put the dequantized weights
    (wq) in the layer; the next subset sees the layer with the earlier subsets quantized;
  - a replay of the fully quantized layer gives the next layer's inputs;
  - the integers are GPTQModel's packing, clamp(round((wq + zero * scale) / scale), 0, 15) - 8,
    with the scales stored fp16.
Memory: one layer in fp32 plus the calibration activations (nsamples x seqlen x hidden fp32, twice).
"""

from __future__ import annotations

import importlib
import os

import torch

from edge_sdk.errors import ConversionError

from .archs import ATTN, MLP
from .quant import QMAX, QMIN, QuantizedLinear, check_group, rtn
from .tensors import embedding_rows, expected_shapes, layer_tensors

SUBSETS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def in_features(shape, proj: str) -> int:
    return {"o_proj": shape.num_heads * shape.head_dim, "down_proj": shape.intermediate_size}.get(proj, shape.hidden_size)


def check_groups(shape, arch, group_size: int) -> None:
    for p in (*ATTN, *MLP):
        check_group(in_features(shape, p), group_size, arch.linear(0, p))


def layer_result(quantized: dict[str, QuantizedLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, ql in quantized.items():
        out[f"{name}.q"], out[f"{name}.scales"] = ql.q, ql.scales
    return out


def from_result(tensors: dict, group_size: int) -> dict[str, QuantizedLinear]:
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: QuantizedLinear(tensors[f"{n}.q"], tensors[f"{n}.scales"], group_size) for n in names}


def rtn_layer(src, shape, arch, i: int, opts) -> dict[str, QuantizedLinear]:
    """One tensor read at a time (every tensor of the layer is checked, as layer_tensors does)."""
    out = {}
    for name, shp in expected_shapes(shape, arch, i).items():
        w = src.get(name, shp)
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in (*ATTN, *MLP):
            out[name.removesuffix(".weight")] = rtn(w, opts.group_size)
    return out


def to_device(name: str) -> torch.device:
    return torch.device(name)


class GPTQLayers:
    """The calibration activations and the GPTQModel settings, carried from one layer to the next.

    With several --devices, layer i runs on devices[i % n]: its weights, its GPTQ tasks and the
    calibration activations move there (tensor.to) before it starts; otherwise every layer runs on
    `device`. GPTQModel spreads modules over GPUs only inside its own whole-model looper."""

    def __init__(self, ck, shape, src, calib, opts, device: torch.device):
        gm = _gptqmodel()
        from transformers import AutoConfig

        self.ck, self.shape, self.src, self.opts, self.device = ck, shape, src, opts, device
        self.devices = tuple(opts.devices) if len(opts.devices) > 1 else (str(device),)
        self.qc = quantize_config(gm, opts)
        self.hf_cfg = AutoConfig.for_model(**{k: v for k, v in ck.config.items() if k not in ("architectures", "transformers_version")})
        self.hf_cfg._attn_implementation = "sdpa"
        module = importlib.import_module(ck.arch.rotary.split(":")[0])
        prefix = ck.arch.rotary.split(":")[1].removesuffix("RotaryEmbedding")
        self.layer_cls = getattr(module, f"{prefix}DecoderLayer")
        rot = getattr(module, ck.arch.rotary.split(":")[1])(self.hf_cfg)
        self.ids = [torch.tensor([ids]) for ids in calib.ids]
        self.total_tokens = sum(len(ids) for ids in calib.ids)
        self.kw = []
        for ids in self.ids:
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
            self.kw.append({"attention_mask": None, "position_ids": pos, "position_embeddings": (cos, sin)})
        self._kw_on: dict[str, list[dict]] = {}

    def device_for(self, i: int) -> torch.device:
        return to_device(self.devices[i % len(self.devices)])

    def _kw(self, dev: torch.device) -> list[dict]:
        if str(dev) not in self._kw_on:
            self._kw_on[str(dev)] = [{"attention_mask": None, "position_ids": kw["position_ids"].to(dev),
                                      "position_embeddings": tuple(t.to(dev) for t in kw["position_embeddings"])}
                                     for kw in self.kw]
        return self._kw_on[str(dev)]

    def embed(self) -> list[torch.Tensor]:
        """Layer 0's inputs: the calibration rows of the embedding, fp32 [1, T, hidden] each."""
        from .streaming import rows_per_chunk

        shp = (self.shape.vocab_size, self.shape.hidden_size)
        rows = embedding_rows(self.src, self.ck.arch.embed, shp, torch.cat([ids[0] for ids in self.ids]), rows_per_chunk(shp[1]))
        return [r.float().unsqueeze(0).to(self.device) for r in rows.split([ids.shape[1] for ids in self.ids])]

    def _hf_layer(self, i: int, w: dict, dev: torch.device):
        layer = self.layer_cls(self.hf_cfg, layer_idx=i)
        prefix = self.ck.arch.layer_prefix.format(i=i) + "."
        layer.load_state_dict({k.removeprefix(prefix): v.float() for k, v in w.items()}, strict=True)
        return layer.to(dev).eval()

    def _forward(self, layer, xs, dev):
        with torch.no_grad():
            return [_out(layer(x, **kw)) for x, kw in zip(xs, self._kw(dev))]

    def layer(self, i: int, xs: list[torch.Tensor]) -> tuple[dict[str, QuantizedLinear], list[torch.Tensor]]:
        arch = self.ck.arch
        dev = self.device_for(i)
        xs = [x.to(dev, non_blocking=False) for x in xs]
        layer = self._hf_layer(i, layer_tensors(self.src, self.shape, arch, i), dev)
        out: dict[str, QuantizedLinear] = {}
        for subset in SUBSETS:
            mods = {p: layer.get_submodule(f"{arch.attn if p in ATTN else arch.mlp}.{p}") for p in subset}
            tasks, hooks = {}, []
            for p, m in mods.items():
                tasks[p] = gptq_task(self.qc, arch.linear(i, p), m, self.total_tokens)
            for p, m in mods.items():
                hooks.append(m.register_forward_hook(_hook(tasks[p], self)))
            try:
                self._forward(layer, xs, dev)
            finally:
                for h in hooks:
                    h.remove()
            for p, m in mods.items():
                out[arch.linear(i, p)], m.weight.data = run_task(tasks[p], self.opts.group_size)
        nxt = self._forward(layer, xs, dev)
        del layer
        return out, nxt


def quantize_config(gm, opts):
    return gm.QuantizeConfig(bits=opts.bits, group_size=opts.group_size, sym=True, desc_act=False,
                             act_group_aware=opts.act_order == "act_group_aware", damp_percent=opts.damp_percent)


def gptq_task(qc, name: str, module, total_tokens: int):
    """GPTQModel's GPTQ step for one linear, set up as its looper sets it up (per-module config, low-sample
    fallback threshold relative to the calibration's total tokens)."""
    from gptqmodel.looper.gptq_processor import clone_gptq_config_for_module
    from gptqmodel.quantization.gptq import GPTQ

    qc = clone_gptq_config_for_module(qc, name)
    t = GPTQ(module=module, qcfg=qc)
    t.fallback, t.expected_nsamples = qc.fallback, total_tokens
    t.quantizer.configure(perchannel=True)
    return t


def run_task(task, group_size: int) -> tuple[QuantizedLinear, torch.Tensor]:
    """-> (the integers, wq: the dequantized weights GPTQModel puts back in the layer)."""
    wq, scales, zeros, _g_idx, *_ = task.quantize()
    task.free()
    return _integers(wq, scales, zeros, group_size), wq


def _hook(task, owner):
    owner.batch = 0

    def hook(module, inp, out):
        task.add_batch(inp[0].data, out.data, batch_index=None)
    return hook


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _integers(wq: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int) -> QuantizedLinear:
    """GPTQModel's packing of wq [out, in] with scales/zeros [out, in / g]: q in 0..15, stored as q - 8."""
    wq, scales, zeros = wq.detach().cpu(), scales.detach().cpu(), zeros.detach().cpu()
    s = scales.repeat_interleave(g, dim=1)
    sz = (zeros * scales).repeat_interleave(g, dim=1)
    q = torch.round((wq + sz) / s).clamp_(0, QMAX - QMIN)
    if not torch.all(zeros == 8):
        raise ConversionError("GPTQModel returned zero points other than 8 for symmetric quantization",
                              hint="this is a converter bug: report it with the GPTQModel version")
    return QuantizedLinear((q.to(torch.int16) - 8).to(torch.int8).contiguous(), scales.to(torch.float16).contiguous(), g)


def _gptqmodel():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    from edge_sdk.errors import require

    return require("gptqmodel", "convert")
