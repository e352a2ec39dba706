"""`edge-sdk plan MODEL --board B`: memory, verdict, speed and power from a model's config."""

from __future__ import annotations

from ._common import print_json


def register(sub) -> None:
    p = sub.add_parser("plan", help="size a model on a Jetson board: memory, fits or not, tokens/s and power per mode",
                       description="MODEL is a Hugging Face model directory, a config.json, a bundle, or a bundled config name "
                                   "(e.g. deepseek-r1-distill-qwen-1.5b).")
    p.add_argument("model", metavar="MODEL_OR_BUNDLE")
    p.add_argument("--board", default="agx-orin-64gb")
    p.add_argument("--context", type=int, default=4096, help="tokens of context per sequence (default 4096)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--mode", default=None, help="power mode id or name (default: the board's default mode)")
    p.add_argument("--storage", default=None, help="storage the weights are paged from when they do not fit")
    p.add_argument("--draft", default=None, metavar="DRAFT_MODEL",
                   help="speculative decoding with this draft model: expected speedup per mode by acceptance rate")
    p.add_argument("--recommend", action="store_true", help="list boards and modes on which the model fits, fastest first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..planner import DECODE_EFFICIENCY, plan, recommend, render

    if args.recommend and args.draft:
        from ..errors import ConfigError

        raise ConfigError("--recommend does not take --draft", hint="plan the pair on one board: edge-sdk plan TARGET --draft DRAFT --board B")
    if args.recommend:
        rows = recommend(args.model, context=args.context, batch=args.batch, bits=args.bits, group_size=args.group_size)
        if args.json:
            print_json([{"board": p.board, "mode": m.mode, "mode_id": m.mode_id, "decode_tokens_per_s": m.decode_tokens_per_s,
                         "decode_bound_tokens_per_s": m.decode_bound_tokens_per_s,
                         "budget_w": m.budget_w, "joules_per_token": m.joules_per_token, "headroom_bytes": p.headroom_bytes} for p, m in rows])
            return 0
        if not rows:
            print(f"{args.model} fits on no board at context {args.context}, batch {args.batch}; see `edge-sdk plan --board ...` for the paged estimate")
            return 1
        print(f"{'board':<15} {'mode':<12} {'power':>6} {'bound tok/s':>12} {'decode tok/s':>13} {'J/token':>8} {'headroom':>11}")
        for p, m in rows:
            print(f"{p.board:<15} {m.mode:<12} {m.budget_w:>4.0f} W {m.decode_bound_tokens_per_s:>12.1f} {m.decode_tokens_per_s:>13.1f} "
                  f"{m.joules_per_token:>8.3f} {p.headroom_bytes / 2**30:>7.2f} GiB")
        print(f"decode: {DECODE_EFFICIENCY:.0%} of the memory-roofline bound (TensorRT-LLM on AGX Orin, published)")
        return 0
    p = plan(args.model, args.board, context=args.context, batch=args.batch, bits=args.bits,
             group_size=args.group_size, mode=args.mode, storage=args.storage, draft=args.draft)
    if args.json:
        print_json(p.to_dict())
    else:
        print(render(p))
    return 0
