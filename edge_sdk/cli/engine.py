"""`edge-sdk engine build BUNDLE`: build the native TensorRT engine on this device, into the engine cache."""

from __future__ import annotations

from pathlib import Path

from ._common import print_json


def register(sub) -> None:
    from .main import add_device_options

    p = sub.add_parser("engine", help="TensorRT engines built on this device")
    esub = p.add_subparsers(dest="engine_command", metavar="ACTION", required=True)
    b = esub.add_parser("build", help="build a TensorRT engine from a bundle's ONNX graph (cached beside the bundle)")
    b.add_argument("bundle", help="bundle directory")
    b.add_argument("--board", help="board the engine is for (default: the emulated board, else 'local')")
    b.add_argument("--max-batch", type=int, default=1)
    b.add_argument("--max-prompt", type=int, default=512, help="longest prefill chunk (tokens)")
    b.add_argument("--max-seq-len", type=int, default=2048, help="KV capacity: prompt + generated tokens")
    b.add_argument("--workspace-mb", type=int, default=1024)
    b.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimization level 0-5")
    b.add_argument("--graph", choices=("fp16", "fp32"), default="fp16")
    b.add_argument("--engine-cache", help="engine cache directory (default: .edge-sdk-engines beside the bundle)")
    b.add_argument("--key", help="trusted ed25519 public key: the bundle's signature must verify")
    b.add_argument("--force", action="store_true", help="rebuild even when a matching engine is cached")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    add_device_options(b)
    b.set_defaults(func=build)


def build(args) -> int:
    from edge_sdk.runtime.backends.tensorrt import require_tensorrt
    from edge_sdk.runtime.loader import open_bundle
    from edge_sdk.runtime.options import RuntimeOptions
    from edge_sdk.runtime.backends.tensorrt.build import EngineBuildSettings, build_engine

    settings = EngineBuildSettings(max_batch=args.max_batch, max_prompt=args.max_prompt, max_seq_len=args.max_seq_len,
                                   opt_prompt=min(128, args.max_prompt), opt_past=min(512, args.max_seq_len - 1),
                                   workspace_mb=args.workspace_mb, optimization_level=args.optimization_level, graph=args.graph)
    opts = RuntimeOptions(board=args.board, emulate=args.emulate if not args.board else None, root=args.root,
                          public_key=args.key, engine_cache_dir=args.engine_cache, provider="tensorrt")
    bundle = Path(args.bundle)
    manifest = open_bundle(bundle, opts)  # verified before TensorRT reads anything
    trt = require_tensorrt()
    report = (lambda m: None) if args.json else (lambda m: print(f"engine: {m}", flush=True))
    path, built = build_engine(bundle, manifest, opts.target_board or "local", trt, settings=settings,
                               cache_root=opts.engine_root(bundle), force=args.force, report=report)
    if args.json:
        print_json({"engine": str(path), "built": built, "tensorrt_version": trt.__version__})
    return 0
