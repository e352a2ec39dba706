"""DeepSeek-V2 / V2-Lite conversion (MLA attention, fine-grained MoE): checks, round-to-nearest int4,
weights file, graph and checks, for float checkpoints small enough to check whole.

Every linear (attention projections, dense MLP, every routed and shared expert) is int4 with fp16
group scales; the router (`mlp.gate`), norms and embeddings are fp16; lm_head int4 or fp16 as asked.
The graph is mla.MLADecoder traced at stub size and pointed at the weights file by onnx_export.rewrite.
"""

from __future__ import annotations

import torch

from edge_sdk.errors import ConfigError, ConversionError

from . import accuracy, onnx_export
from .checkpoint import TOKENIZER_FILES
from .mla import MLADecoder, attention_linears, attention_norms, attention_scale, mlp_linears, rope_tables, stub_weights
from .quant import QuantizedLinear, check_group, pack_int4_chunks, rtn

ARCH = "DeepseekV2ForCausalLM"
ROUTING_METHODS = ("greedy", "group_limited_greedy")
WHOLE_MODEL_PARAMS = 200_000_000  # the checks hold the float and int4 models whole in fp32


def routing(cfg: dict) -> dict:
    return {"topk_method": cfg.get("topk_method") or "greedy", "n_group": int(cfg.get("n_group") or 1),
            "topk_group": int(cfg.get("topk_group") or 1), "routed_scaling_factor": float(cfg.get("routed_scaling_factor") or 1.0),
            "scoring_func": cfg.get("scoring_func") or "softmax", "norm_topk_prob": bool(cfg.get("norm_topk_prob", False))}


def check_config(cfg: dict, s, source: str = "config.json") -> dict:
    """Refuse what the graph cannot compute exactly, one line each; returns the routing settings."""
    r = routing(cfg)
    if r["topk_method"] not in ROUTING_METHODS:
        raise ConfigError(f"{source}: routing topk_method {r['topk_method']!r} is not supported for {ARCH}",
                          hint=f"supported: {', '.join(ROUTING_METHODS)} (DeepSeek-V3's noaux_tc routing is not converted yet)")
    if r["scoring_func"] != "softmax":
        raise ConfigError(f"{source}: routing scoring_func {r['scoring_func']!r} is not supported for {ARCH}", hint="supported: softmax")
    if r["norm_topk_prob"]:
        raise ConfigError(f"{source}: norm_topk_prob true is not supported for {ARCH}",
                          hint="DeepSeek-V2 and V2-Lite ship norm_topk_prob false; transformers' DeepseekV2 ignores it")
    if s.moe_layer_freq != 1:
        raise ConfigError(f"{source}: moe_layer_freq {s.moe_layer_freq} is not supported for {ARCH}",
                          hint="every layer from first_k_dense_replace on is an MoE layer (moe_layer_freq 1)")
    if s.n_routed_experts and s.moe_intermediate_size <= 0:
        raise ConfigError(f"{source}: moe_intermediate_size must be a positive integer with n_routed_experts {s.n_routed_experts}")
    if r["topk_method"] == "group_limited_greedy":
        g, tg = r["n_group"], r["topk_group"]
        if s.n_routed_experts % g or not 1 <= tg <= g or s.num_experts_per_tok > tg * (s.n_routed_experts // g):
            raise ConfigError(f"{source}: group-limited routing with n_group {g}, topk_group {tg} does not fit "
                              f"{s.n_routed_experts} experts and num_experts_per_tok {s.num_experts_per_tok}",
                              hint="n_group must divide n_routed_experts, 1 <= topk_group <= n_group, and the kept groups must hold top-k experts")
    if (s.kv_lora_rank + s.qk_rope_head_dim) % 2:
        raise ConfigError(f"{source}: kv_lora_rank + qk_rope_head_dim = {s.kv_lora_rank + s.qk_rope_head_dim} is odd",
                          hint="the cache stores the latent and rope key as two equal halves")
    return r


def check_experts(src, s) -> None:
    """Every weight config.json implies is in the checkpoint (an expert missing for some layers is named)."""
    missing = [n for i in range(s.num_layers) for n in layer_names(s, i) if n not in src]
    if missing:
        experts = sorted({n.split(".mlp.experts.")[1].split(".")[0] for n in missing if ".mlp.experts." in n}, key=int)
        what = f"weights of routed expert(s) {', '.join(experts)}" if experts else "weights"
        raise ConversionError(f"{src.path}: {len(missing)} {what} missing from the checkpoint, e.g. {missing[0]}",
                              hint=f"config.json says n_routed_experts {s.n_routed_experts}: download every shard of the same revision")


def layer_names(s, i: int) -> list[str]:
    """Every tensor name of decoder layer i, in weights-file order."""
    p = f"model.layers.{i}"
    names = [f"{p}.input_layernorm.weight"]
    names += [f"{p}.self_attn.{n}.weight" for n in (*attention_linears(s), *attention_norms(s))]
    names.append(f"{p}.post_attention_layernorm.weight")
    if s.is_moe_layer(i):
        names.append(f"{p}.mlp.gate.weight")
    return names + [f"{p}.mlp.{n}.weight" for n in mlp_linears(s, i)]


def is_quantized(name: str) -> bool:
    return name.endswith("_proj.weight") or name.endswith("kv_a_proj_with_mqa.weight")


def refuse_early(ck, shape, opts, src) -> dict:
    """All refusals before any heavy work."""
    r = check_config(ck.config, shape, str(ck.path / "config.json"))
    if ck.quantization_config is not None:
        raise ConversionError(f"{ck.path}: importing a GPTQ checkpoint of {ARCH} is not supported", hint="convert the float checkpoint")
    if opts.method != "rtn":
        raise ConversionError(f"--method {opts.method} is not supported for {ARCH} yet",
                              hint="pass --method rtn (round-to-nearest int4 for every expert and projection)")
    if opts.dry_run:
        raise ConversionError(f"--dry-run is not supported for {ARCH} yet", hint="run the conversion itself")
    if "fp16" in opts.graphs:
        raise ConversionError(f"the fp16 graph is not built for {ARCH} yet", hint="convert with the fp32 graph only")
    check_experts(src, shape)
    params = sum(_numel(src.shape(n)) for n in src.names())
    if params > WHOLE_MODEL_PARAMS:
        raise ConversionError(f"{ck.path}: {params:,} parameters; {ARCH} conversion holds the whole model in memory, "
                              f"up to {WHOLE_MODEL_PARAMS:,} parameters for now",
                              hint="layer-by-layer conversion of DeepSeek-V2 models is not available yet")
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


def quantize(src, shape, opts) -> tuple[dict, dict]:
    """-> (float weights {name: fp32 tensor}, {module: QuantizedLinear}) by round-to-nearest."""
    weights = {n: src.get(n).float() for n in src.names()}
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

    half("model.embed_tokens.weight", weights["model.embed_tokens.weight"])
    for i in range(shape.num_layers):
        for n in layer_names(shape, i):
            m = n.removesuffix(".weight")
            if m in quantized:
                quant(m, quantized[m])
            else:  # the router feeds MatMul as [hidden, experts]
                half(n, weights[n].t() if n.endswith(".mlp.gate.weight") else weights[n])
    half("model.norm.weight", weights["model.norm.weight"])
    if "lm_head" in quantized:
        quant("lm_head", quantized["lm_head"])
    else:
        half("lm_head.weight", weights["lm_head.weight"].t())
    return w.close(), fp16, groups


def stored(weights, quantized) -> dict:
    """What the bundle stores, as fp32: q * scale for int4 linears, fp16-rounded values otherwise."""
    out = {n: t.half().float() for n, t in weights.items()}
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
    r = refuse_early(ck, shape, opts, src)
    inv_freq, rope_scale = rope_tables(ck.config)
    scale = attention_scale(ck.config, shape)
    with stages("quantize"):
        weights, quantized = quantize(src, shape, opts)
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
        report: dict = {}
        if opts.verify:
            with stages("verify"):
                report["onnx_vs_torch"] = accuracy.check_onnx(tmp / fname, quant_model, shape, calib.ids, seed=opts.seed)
        with stages("accuracy"):
            quant_nll = accuracy.nll(quant_model, eval_tokens[: opts.eval_tokens], bos)
            del quant_model
            float_model = MLADecoder(shape, weights, r, inv_freq, rope_scale, scale).eval()
            report |= accuracy.report(accuracy.nll(float_model, eval_tokens[: opts.eval_tokens], bos), quant_nll)
            del float_model
        report["reference"] = "float checkpoint"
        report["max_ppl_increase_percent"] = opts.max_ppl_increase
        report["min_top1_agreement"] = opts.min_top1_agreement
        accuracy.gate(report, opts.max_ppl_increase, opts.min_top1_agreement)
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
                "qk_rope_head_dim": shape.qk_rope_head_dim, "v_head_dim": shape.v_head_dim},
        "moe": {"n_routed_experts": shape.n_routed_experts, "n_shared_experts": shape.n_shared_experts,
                "num_experts_per_tok": shape.num_experts_per_tok, "moe_intermediate_size": shape.moe_intermediate_size,
                "first_k_dense_replace": shape.first_k_dense_replace, "routing": r,
                "formulation": "every routed expert computed, weighted by its routing weight (0 outside the top-k)"}}
    quantization = quant_section(opts, calib) | {"lm_head_dtype": opts.lm_head_dtype, "embed_dtype": opts.embed_dtype,
                                                 "router_dtype": "fp16"}
    manifest = bundle_manifest(ck, architecture=arch, quantization=quantization, graphs=graphs, weights=wsec,
                               io=io_section(shape), tokenizer=tk, accuracy=report)
    return write_manifest(tmp, manifest, sign_key=opts.sign_key)
