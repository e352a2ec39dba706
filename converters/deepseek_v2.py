"""DeepSeek-V2 / V2-Lite conversion (MLA attention, fine-grained MoE): checks, round-to-nearest int4,
weights file, graph and checks, for float checkpoints small enough to check whole.

Every linear (attention projections, dense MLP, every routed and shared expert) is int4 with fp16
group scales; the router (`mlp.gate`), norms and embeddings are fp16; lm_head int4 or fp16 as asked.
The graph is mla.MLADecoder traced at stub size and pointed at the weights file by onnx_export.rewrite.
"""

from __future__ import annotations

import math

import torch

from edge_sdk.errors import ConfigError, ConversionError

from . import accuracy, onnx_export
from .checkpoint import TOKENIZER_FILES
from .mla import MLADecoder, attention_linears, attention_norms, attention_scale, interleave, mlp_linears, rope_tables, stub_weights
from .quant import QuantizedLinear, check_group, pack_int4_chunks, rtn

ARCH = "DeepseekV2ForCausalLM"
CORRECTION_BIAS = "e_score_correction_bias"  # V3's per-expert router bias, added to the scores for selection only
# What transformers computes per architecture (its DeepseekV2 ignores norm_topk_prob; its DeepseekV3 always
# scores by sigmoid with noaux_tc selection), and the defaults its config classes give to absent keys.
ROUTING = {
    "DeepseekV2ForCausalLM": {"topk_method": ("greedy", "group_limited_greedy"), "scoring_func": ("softmax",), "norm_topk_prob": (False,),
                              "defaults": {"topk_method": "greedy", "scoring_func": "softmax", "n_group": 1, "topk_group": 1,
                                           "norm_topk_prob": False, "routed_scaling_factor": 1.0}},
    "DeepseekV3ForCausalLM": {"topk_method": ("noaux_tc",), "scoring_func": ("sigmoid",), "norm_topk_prob": (False, True),
                              "defaults": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 8, "topk_group": 4,
                                           "norm_topk_prob": True, "routed_scaling_factor": 2.5}},
}
GROUPED = ("group_limited_greedy", "noaux_tc")
WHOLE_MODEL_PARAMS = 200_000_000  # above: deepseek_v2_streamed (the checks here hold the float and int4 models whole in fp32)


def routing(cfg: dict) -> dict:
    """The routing settings of config.json, absent keys filled as transformers fills them."""
    d = ROUTING[_arch(cfg)]["defaults"]
    return {"topk_method": _given(cfg, "topk_method", d), "n_group": _number(cfg, "n_group", d, int),
            "topk_group": _number(cfg, "topk_group", d, int), "routed_scaling_factor": _number(cfg, "routed_scaling_factor", d, float),
            "scoring_func": _given(cfg, "scoring_func", d), "norm_topk_prob": _flag(cfg, "norm_topk_prob", d)}


ROUTING_NUMBER_MAX = 10_000  # n_group, topk_group, routed_scaling_factor (releases: up to 8, 4 and 16)


def _given(cfg: dict, key: str, defaults: dict):
    """The value as written (0, false and "" included); absent or null: the default."""
    v = cfg.get(key)
    return defaults[key] if v is None else v


def _number(cfg: dict, key: str, defaults: dict, kind):
    v = _given(cfg, key, defaults)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)) \
            or not 0 < v <= ROUTING_NUMBER_MAX or (kind is int and v != int(v)):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"config.json: routing {key} {v!r} is not {what} in (0, {ROUTING_NUMBER_MAX}]",
                          hint="write it as the release's config.json does")
    return kind(v)


def _flag(cfg: dict, key: str, defaults: dict) -> bool:
    v = _given(cfg, key, defaults)
    if not isinstance(v, bool):
        raise ConfigError(f"config.json: routing {key} {v!r} is not true or false", hint="write it as the release's config.json does")
    return v


def _arch(cfg: dict) -> str:
    archs = cfg.get("architectures")  # read as modelspec.shape_from_config reads it
    name = archs[0] if isinstance(archs, list) and archs else cfg.get("model_type")
    return name if isinstance(name, str) and name in ROUTING else ARCH


def check_config(cfg: dict, s, source: str = "config.json") -> dict:
    """Refuse what the graph cannot compute exactly, one line each; returns the routing settings."""
    r, arch = routing(cfg), _arch(cfg)
    allowed = ROUTING[arch]
    for key in ("topk_method", "scoring_func"):
        if r[key] not in allowed[key]:
            raise ConfigError(f"{source}: routing {key} {r[key]!r} is not supported for {arch}",
                              hint=f"supported: {', '.join(allowed[key])} (what transformers' {arch.removesuffix('ForCausalLM')} computes)")
    if r["norm_topk_prob"] not in allowed["norm_topk_prob"]:
        raise ConfigError(f"{source}: norm_topk_prob true is not supported for {arch}",
                          hint="DeepSeek-V2 and V2-Lite ship norm_topk_prob false; transformers' DeepseekV2 ignores it")
    if arch != ARCH:
        _check_v3(cfg, source)
    _check_moe_numbers(cfg, source)
    if s.moe_layer_freq != 1:
        raise ConfigError(f"{source}: moe_layer_freq {s.moe_layer_freq} is not supported for {arch}",
                          hint="every layer from first_k_dense_replace on is an MoE layer (moe_layer_freq 1)")
    if s.n_routed_experts and s.moe_intermediate_size <= 0:
        raise ConfigError(f"{source}: moe_intermediate_size must be a positive integer with n_routed_experts {s.n_routed_experts}")
    if r["topk_method"] in GROUPED:
        g, tg = r["n_group"], r["topk_group"]
        least = 2 if r["topk_method"] == "noaux_tc" else 1  # noaux_tc ranks a group by the sum of its best two
        if s.n_routed_experts % g or not 1 <= tg <= g or s.num_experts_per_tok > tg * (s.n_routed_experts // g) \
                or s.n_routed_experts // g < least:
            raise ConfigError(f"{source}: group-limited routing with n_group {g}, topk_group {tg} does not fit "
                              f"{s.n_routed_experts} experts and num_experts_per_tok {s.num_experts_per_tok}",
                              hint="n_group must divide n_routed_experts, 1 <= topk_group <= n_group, the kept groups must hold "
                                   f"top-k experts{' and each group at least 2 (noaux_tc)' if least == 2 else ''}")
    if (s.kv_lora_rank + s.qk_rope_head_dim) % 2:
        raise ConfigError(f"{source}: kv_lora_rank + qk_rope_head_dim = {s.kv_lora_rank + s.qk_rope_head_dim} is odd",
                          hint="the cache stores the latent and rope key as two equal halves")
    return r


MOE_NUMBER_MAX = 4096  # n_routed_experts and the other MoE counts (releases: up to 384 experts)


def _check_moe_numbers(cfg: dict, source: str) -> None:
    """The MoE counts as written: integers in [0, MOE_NUMBER_MAX] (the checks list every expert's weights)."""
    for key in ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "moe_layer_freq"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MOE_NUMBER_MAX):
            raise ConfigError(f"{source}: {key} {v!r} is not an integer in [0, {MOE_NUMBER_MAX}]",
                              hint="write it as the release's config.json does")
    v = cfg.get("moe_intermediate_size")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):  # its sign: check_config, with the experts
        raise ConfigError(f"{source}: moe_intermediate_size {v!r} is not an integer", hint="write it as the release's config.json does")


def _check_v3(cfg: dict, source: str) -> None:
    """What DeepSeek-V3 adds to the V2 graph: the rope pairs' layout and the dense layers' count."""
    if cfg.get("rope_interleave", True) is not True:
        raise ConfigError(f"{source}: rope_interleave {cfg['rope_interleave']!r} is not supported for DeepseekV3ForCausalLM",
                          hint="the graph rotates interleaved pairs, as DeepSeek-V3 and R1 ship (rope_interleave true)")
    if cfg.get("first_k_dense_replace") is None:
        raise ConfigError(f"{source}: first_k_dense_replace is missing for DeepseekV3ForCausalLM",
                          hint="state it as the release's config.json does (transformers assumes 3 when absent)")


def check_experts(src, s) -> None:
    """Every weight config.json implies is in the checkpoint (an expert missing for some layers is named)."""
    missing = [n for i in range(s.num_layers) for n in layer_names(s, i) if n not in src]
    bias = [n.split(".")[2] for n in missing if n.endswith(CORRECTION_BIAS)]
    if bias:
        raise ConversionError(f"{src.path}: the router's {CORRECTION_BIAS} is missing for layer(s) {', '.join(bias)}",
                              hint=f"{s.architecture} selects experts by sigmoid score + {CORRECTION_BIAS}: "
                                   "download every shard of the same revision (or convert it as the architecture it is)")
    if missing:
        experts = sorted({n.split(".mlp.experts.")[1].split(".")[0] for n in missing if ".mlp.experts." in n}, key=int)
        what = f"weights of routed expert(s) {', '.join(experts)}" if experts else "weights"
        raise ConversionError(f"{src.path}: {len(missing)} {what} missing from the checkpoint, e.g. {missing[0]}",
                              hint=f"config.json says n_routed_experts {s.n_routed_experts}: download every shard of the same revision")
    router = {f"model.layers.{i}.mlp.gate.{n}": shp for i in range(s.num_layers) if s.is_moe_layer(i)
              for n, shp in (("weight", [s.n_routed_experts, s.hidden_size]), (CORRECTION_BIAS, [s.n_routed_experts]))
              if n == "weight" or s.router_bias}
    for n, want in router.items():
        if list(src.shape(n)) != want:
            raise ConversionError(f"{src.path}: {n} has shape {list(src.shape(n))}, not {want} (n_routed_experts, hidden_size)",
                                  hint="config.json and the weights disagree: download both from the same revision")


def layer_names(s, i: int) -> list[str]:
    """Every tensor name of decoder layer i, in weights-file order."""
    p = f"model.layers.{i}"
    names = [f"{p}.input_layernorm.weight"]
    names += [f"{p}.self_attn.{n}.weight" for n in (*attention_linears(s), *attention_norms(s))]
    names.append(f"{p}.post_attention_layernorm.weight")
    if s.is_moe_layer(i):
        names += [f"{p}.mlp.gate.weight"] + ([f"{p}.mlp.gate.{CORRECTION_BIAS}"] if s.router_bias else [])
    return names + [f"{p}.mlp.{n}.weight" for n in mlp_linears(s, i)]


def is_quantized(name: str) -> bool:
    return name.endswith("_proj.weight") or name.endswith("kv_a_proj_with_mqa.weight")


def refuse_early(ck, shape, opts, src) -> dict:
    """All refusals before any heavy work."""
    r = check_config(ck.config, shape, str(ck.path / "config.json"))
    if ck.quantization_config is not None:
        raise ConversionError(f"{ck.path}: importing a GPTQ checkpoint of {shape.architecture} is not supported", hint="convert the float checkpoint")
    if opts.method == "gptq":  # whole model or one layer at a time (deepseek_v2_streamed), the same per-layer step
        from .layerwise import _gptqmodel

        _gptqmodel()  # installed, or one line naming the extra
    if opts.dry_run:
        raise ConversionError(f"--dry-run is not supported for {shape.architecture} yet", hint="run the conversion itself")
    if "fp16" in opts.graphs:
        raise ConversionError(f"the fp16 graph is not built for {shape.architecture} yet", hint="convert with the fp32 graph only")
    check_experts(src, shape)
    for i in range(shape.num_layers):
        for n in layer_names(shape, i):
            if is_quantized(n):
                check_group(src.shape(n)[1], opts.group_size, n)
    return r


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def quantize(src, shape, opts, calib=None, cfg=None, report=None) -> tuple[dict, dict]:
    """-> (float weights {name: fp32 tensor}, {module: QuantizedLinear}) by round-to-nearest, or by GPTQ
    (deepseek_v2_gptq) over the calibration windows, its expert coverage added to `report`."""
    weights = {n: src.get(n).float() for n in src.names()}
    if opts.method == "gptq":
        from .deepseek_v2_gptq import gptq_mla, summary

        quantized, stats = gptq_mla(weights, shape, cfg, routing(cfg), calib, opts)
        if report is not None:
            report["gptq"] = summary(stats)
    else:
        quantized = {n.removesuffix(".weight"): rtn(weights[n], opts.group_size)
                     for i in range(shape.num_layers) for n in layer_names(shape, i) if is_quantized(n)}
    head = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    if opts.lm_head_dtype == "int4":
        quantized["lm_head"] = rtn(weights[head], opts.group_size)
    elif "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights[head]
    return weights, quantized


def write_weights(path, shape, weights, quantized) -> tuple[dict, set[str], dict]:
    from types import SimpleNamespace

    from .streaming import StreamWriter

    w, fp16, groups = StreamWriter(path), set(), {}

    def half(name, t):
        fp16.add(name)
        w.add(name, "float16", tuple(t.shape), [t.to(torch.float16).contiguous().numpy().tobytes()])

    def quant(module, ql: QuantizedLinear):
        q_t, s_t = ql.q.t(), ql.scales.t().contiguous()  # [in, out], [in / g, out]
        w.add(f"{module}.qweight", "int4", tuple(q_t.shape), pack_int4_chunks(q_t))
        w.add(f"{module}.scales", "float16", tuple(s_t.shape), [s_t.numpy().tobytes()])
        groups[module] = SimpleNamespace(group_size=ql.group_size)

    def stacked(module, qls: list[QuantizedLinear]):
        q = torch.stack([ql.q for ql in qls])  # [E, out, in]
        s_t = torch.stack([ql.scales for ql in qls]).contiguous()  # [E, out, in / g]
        w.add(f"{module}.qweight", "uint8", (*q.shape[:2], q.shape[2] // 2), pack_uint4_chunks(q))
        w.add(f"{module}.scales", "float16", tuple(s_t.shape), [s_t.numpy().tobytes()])
        groups[module] = SimpleNamespace(group_size=qls[0].group_size, stacked=True)

    half("model.embed_tokens.weight", weights["model.embed_tokens.weight"])
    for i in range(shape.num_layers):
        for n in layer_names(shape, i):
            m = n.removesuffix(".weight")
            if ".mlp.experts." in m:
                if m.endswith(".experts.0.gate_proj"):  # all routed experts of the layer, at the first one's place
                    p, e = m.removesuffix(".0.gate_proj"), range(shape.n_routed_experts)
                    stacked(f"{p}.gate_up_proj", [interleaved(quantized[f"{p}.{j}.gate_proj"], quantized[f"{p}.{j}.up_proj"]) for j in e])
                    stacked(f"{p}.down_proj", [quantized[f"{p}.{j}.down_proj"] for j in e])
            elif m in quantized:
                quant(m, quantized[m])
            elif n.endswith(CORRECTION_BIAS):  # fp32: a large common offset with a small spread that decides the top-k
                w.add(n, "float32", tuple(weights[n].shape), [weights[n].float().contiguous().numpy().tobytes()])
            else:  # the router feeds MatMul as [hidden, experts]
                half(n, weights[n].t() if n.endswith(".mlp.gate.weight") else weights[n])
    half("model.norm.weight", weights["model.norm.weight"])
    if "lm_head" in quantized:
        quant("lm_head", quantized["lm_head"])
    else:
        half("lm_head.weight", weights["lm_head.weight"].t())
    return w.close(), fp16, groups


def interleaved(gate: QuantizedLinear, up: QuantizedLinear) -> QuantizedLinear:
    """One expert's gate and up rows interleaved (gate 0, up 0, gate 1, ...): QMoE's fused SwiGLU fc1."""
    return QuantizedLinear(interleave(gate.q[None], up.q[None])[0], interleave(gate.scales[None], up.scales[None])[0], gate.group_size)


def pack_uint4_chunks(q: torch.Tensor):
    """int4 values [E, out, in] -> QMoE's uint4 bytes, one expert at a time: q + 8 (zero point 8), two per
    byte along `in`, the first in the low nibble."""
    for e in range(q.shape[0]):
        u = (q[e].to(torch.int16) + 8).reshape(-1, 2)
        yield (u[:, 0] | (u[:, 1] << 4)).to(torch.uint8).numpy().tobytes()


def stored(weights, quantized) -> dict:
    """What the bundle stores, as fp32: q * scale for int4 linears, fp16-rounded values otherwise."""
    out = {n: t.float() if n.endswith(CORRECTION_BIAS) else t.half().float() for n, t in weights.items()}
    for m, ql in quantized.items():
        out[f"{m}.weight"] = ql.dequantize()
    return out


def io_section(shape) -> dict:
    half = (shape.kv_lora_rank + shape.qk_rope_head_dim) // 2
    inputs, outputs = onnx_export.io_names(shape.num_layers)
    return {"inputs": inputs, "outputs": outputs,
            "kv": {"num_layers": shape.num_layers, "num_kv_heads": 1, "head_dim": half, "layout": "BHSD",
                   "past": "past_key_values.{i}.{kind}", "present": "present.{i}.{kind}",
                   "mla": {"kv_lora_rank": shape.kv_lora_rank, "qk_rope_head_dim": shape.qk_rope_head_dim,
                           "packing": "key ++ value (last axis) = [normalised latent, rotated rope key]"}}}


def run(ck, shape, output, opts, stages, *, tk, calib, eval_tokens, bos, **_) -> tuple[dict, dict, dict]:
    """-> (manifest, report, extra summary), as streamed_convert.run. Writes the bundle at `output`."""
    from edge_sdk.bundle import staged_directory

    from .pipeline import export_graphs
    from .tensors import TensorSource

    src = TensorSource(ck.path, ck.safetensors)
    if sum(_numel(src.shape(n)) for n in src.names()) > WHOLE_MODEL_PARAMS:  # one decoder layer at a time
        from . import deepseek_v2_streamed

        return deepseek_v2_streamed.run(ck, shape, output, opts, stages, src=src, tk=tk, calib=calib, eval_tokens=eval_tokens, bos=bos)
    r = refuse_early(ck, shape, opts, src)
    inv_freq, rope_scale = rope_tables(ck.config)
    scale = attention_scale(ck.config, shape)
    gptq_report: dict = {}
    with stages("quantize"):
        weights, quantized = quantize(src, shape, opts, calib, ck.config, gptq_report)
    with staged_directory(output, overwrite=opts.overwrite) as tmp:
        with stages("export"):
            wsec, fp16_names, groups = write_weights(tmp / "model.weights", shape, weights, quantized)
            small, stub = stub_weights(shape)
            graphs = export_graphs(tmp, ["fp32"], lambda _dtype: MLADecoder(small, stub, r, inv_freq, rope_scale, scale).eval(),
                                   shape, groups, fp16_names, wsec)
            fname = graphs["fp32"]["file"]
            for f in TOKENIZER_FILES:
                (tmp / f).write_bytes((ck.path / f).read_bytes())
        quant_model = MLADecoder(shape, stored(weights, quantized), r, inv_freq, rope_scale, scale).eval()
        report: dict = dict(gptq_report)
        if opts.verify:
            with stages("verify"):
                report["onnx_vs_torch"] = accuracy.check_onnx(tmp / fname, quant_model, shape, calib.ids, seed=opts.seed)
        with stages("accuracy"):
            quant_nll = accuracy.nll(quant_model, eval_tokens[: opts.eval_tokens], bos)
            del quant_model
            float_model = MLADecoder(shape, weights, r, inv_freq, rope_scale, scale).eval()
            report |= accuracy.report(accuracy.nll(float_model, eval_tokens[: opts.eval_tokens], bos), quant_nll)
            del float_model
        accuracy.settle(report, opts)
        with stages("package"):
            manifest = package(tmp, ck, shape, opts, calib, tk, graphs, wsec, report, r)
    return manifest, report, {"weights": wsec, "routing": r}


def package(tmp, ck, shape, opts, calib, tk, graphs, wsec, report, r) -> dict:
    from .manifest import bundle_manifest
    from edge_sdk.bundle import write_manifest

    from .pipeline import architecture_section
    from .streaming import quant_section

    arch = architecture_section(ck.config, shape) | {
        "mla": {"q_lora_rank": shape.q_lora_rank, "kv_lora_rank": shape.kv_lora_rank, "qk_nope_head_dim": shape.qk_nope_head_dim,
                "qk_rope_head_dim": shape.qk_rope_head_dim, "v_head_dim": shape.v_head_dim,
                "attention": "absorbed (kv_b_proj folded into the query and the output; the latent is never expanded)"},
        "moe": {"n_routed_experts": shape.n_routed_experts, "n_shared_experts": shape.n_shared_experts,
                "num_experts_per_tok": shape.num_experts_per_tok, "moe_intermediate_size": shape.moe_intermediate_size,
                "first_k_dense_replace": shape.first_k_dense_replace, "routing": r,
                "formulation": "com.microsoft QMoE: only each token's top-k experts read and computed"}}
    quantization = quant_section(opts, calib) | {"lm_head_dtype": opts.lm_head_dtype, "embed_dtype": opts.embed_dtype,
                                                 "router_dtype": "fp16"} | ({"router_bias_dtype": "fp32"} if shape.router_bias else {})
    manifest = bundle_manifest(ck, architecture=arch, quantization=quantization, graphs=graphs, weights=wsec,
                               io=io_section(shape), tokenizer=tk, accuracy=report)
    return write_manifest(tmp, manifest, sign_key=opts.sign_key)
