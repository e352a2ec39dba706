"""`edge-sdk convert MODEL_DIR -o BUNDLE`: GPTQ int4 -> ONNX with KV cache -> signed release bundle."""

from __future__ import annotations

from ._common import print_json


def register(sub) -> None:
    p = sub.add_parser("convert", help="quantize a checkpoint to GPTQ int4, export ONNX, write a release bundle",
                       description="MODEL_DIR is a local Hugging Face directory (config.json, *.safetensors, tokenizer.json, "
                                   "tokenizer_config.json) of a Qwen2ForCausalLM or LlamaForCausalLM model, float or already GPTQ-quantized.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle directory to write (written atomically)")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="gptq (default) or rtn (round-to-nearest baseline)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--damp-percent", type=float, default=0.05)
    p.add_argument("--act-order", choices=["act_group_aware", "none"], default="act_group_aware")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", metavar="FILE", help="calibration text (.txt) or JSONL with a \"text\" field (default: the SDK's set)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--eval-text", metavar="FILE", help="held-out text for the accuracy report")
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--lm-head-dtype", choices=["int4", "fp16"], default="int4")
    p.add_argument("--fp16-graph", action="store_true", help="also write model.fp16.onnx (fp16 activations, for TensorRT/CUDA)")
    p.add_argument("--max-ppl-increase", type=float, metavar="PERCENT", help="fail when perplexity rises more than this")
    p.add_argument("--min-top1-agreement", type=float, metavar="FRACTION",
                   help="fail when fewer held-out tokens than this keep the float model's top-1 prediction (e.g. 0.9)")
    p.add_argument("--sign-key", metavar="KEY", help="ed25519 private key: write manifest.sig")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX vs PyTorch check")
    p.add_argument("--work-dir", metavar="DIR", help="per-layer results, kept until the bundle is written (default: BUNDLE.work); "
                                                    "the same command after an interruption continues from the last finished layer")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory after the bundle is written")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--devices", metavar="LIST", help="CUDA devices, comma-separated (cuda:0,cuda:1)")
    p.add_argument("--dry-run", action="store_true", help="convert the first layer only; print predicted peak RAM, disk and time")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import edge_sdk

    summary = edge_sdk.convert(
        args.model_dir, args.output, method=args.method, group_size=args.group_size, damp_percent=args.damp_percent,
        act_order=args.act_order, seed=args.seed, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        eval_text=args.eval_text, eval_tokens=args.eval_tokens, lm_head_dtype=args.lm_head_dtype,
        graphs=("fp32", "fp16") if args.fp16_graph else ("fp32",), max_ppl_increase=args.max_ppl_increase,
        min_top1_agreement=args.min_top1_agreement,
        sign_key=args.sign_key, overwrite=args.overwrite, verify=not args.no_verify, progress=not args.json,
        work_dir=args.work_dir, keep_work=args.keep_work, device=args.device, dry_run=args.dry_run,
        devices=tuple(d.strip() for d in args.devices.split(",") if d.strip()) if args.devices else (),
    )
    if args.json:
        print_json(summary)
        return 0
    if summary.get("dry_run"):
        pr = summary["predicted"]
        print(f"predicted for {summary['layers']} layers on {summary['device']} (measured on layer {summary['measured_layer']}):")
        print(f"  peak memory   {pr['peak_rss_bytes'] / 2**30:.2f} GiB"
              + (f", GPU {pr['gpu_peak_bytes'] / 2**30:.2f} GiB" if pr["gpu_peak_bytes"] else ""))
        print(f"  disk          {pr['disk_bytes'] / 2**30:.2f} GiB (weights {pr['bundle_weight_bytes'] / 2**30:.2f} GiB, "
              f"work directory {pr['work_dir_bytes'] / 2**30:.2f} GiB)")
        print(f"  time          {pr['seconds'] / 60:.1f} min ({', '.join(f'{k} {v:.1f}s' for k, v in pr['seconds_per_layer'].items())} per layer)")
        print(f"  work dir      {summary['work_dir']} (the conversion continues from it)")
        return 0
    acc, q = summary["accuracy"], summary["quantization"]
    print(f"wrote {summary['output']}")
    print(f"  quantization  {q['method']} int{q['bits']} g{q['group_size']} symmetric, lm_head {q['lm_head_dtype']}"
          + (" (imported checkpoint)" if q.get("imported") else ""))
    print(f"  weights       {summary['weight_bytes'] / 2**20:.2f} MiB; files " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in summary["files"].items()))
    if "onnx_vs_torch" in acc:
        print(f"  onnx check    max |logit diff| {acc['onnx_vs_torch']['max_abs_logit_diff']:.2e}, greedy tokens equal")
    print(f"  accuracy      ppl {acc['ppl_float']:.3f} -> {acc['ppl_quant']:.3f} ({acc['ppl_increase_percent']:+.2f}%), "
          f"top-1 agreement {acc['top1_agreement'] * 100:.1f}% on {acc['eval_tokens']} tokens")
    if "gptq" in acc:  # MoE: routed experts without enough calibration tokens are round-to-nearest
        g = acc["gptq"]
        print(f"  experts       {g['gptq_routed_experts']} routed experts by GPTQ, {g['rtn_fallback_experts']} round-to-nearest "
              "(fewer than 0.5% of the calibration tokens reached them)")
    print("  time          " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["seconds"].items()))
    print(f"  peak memory   {summary['peak_rss_bytes'] / 2**30:.2f} GiB")
    if summary.get("layer_seconds"):
        ls = list(summary["layer_seconds"].values())
        print(f"  per layer     {sum(ls) / len(ls):.2f}s mean over {len(ls)} layers on {summary.get('device')}")
    print(f"  library log   {summary['log']}")
    return 0
