"""`edge-sdk run BUNDLE --prompt TEXT` (streams to the terminal) and `edge-sdk bench BUNDLE [--json]`."""

from __future__ import annotations

import sys

from ._common import bundle_path, int_at_least, number_in, print_json


def _load_options(p) -> None:
    from .main import add_device_options

    p.add_argument("bundle", help="bundle directory written by `edge-sdk convert`")
    p.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda", "tensorrt-ep", "tensorrt"),
                   help="auto: TensorRT EP > CUDA EP > CPU by availability; tensorrt: native engine from `edge-sdk engine build`")
    p.add_argument("--threads", type=int_at_least(1), help="CPU threads (default: all cores)")
    p.add_argument("--accuracy-level", type=int, choices=range(5), default=4, help="int4 MatMul activations: 1 exact fp32 ... 4 int8 (fastest)")
    p.add_argument("--graph", default="auto", choices=("auto", "fused", "standard"),
                   help="CPU provider: fused onnxruntime graph built from the bundle (auto) or the bundle's own graph")
    p.add_argument("--no-huge-pages", action="store_true", help="keep the weights on small pages")
    p.add_argument("--max-seq-len", type=int_at_least(2), help="KV capacity per sequence (tokens)")
    p.add_argument("--key", help="trusted ed25519 public key: the bundle's signature must verify")
    p.add_argument("--board", help="board the bundle runs on (checked against the bundle)")
    p.add_argument("--draft", metavar="BUNDLE", type=bundle_path, help="speculate with this smaller bundle (same tokenizer)")
    p.add_argument("--prompt-lookup", action="store_true", help="speculate with n-grams copied from the prompt")
    p.add_argument("--spec-k", type=int_at_least(1), default=4, help="draft tokens per speculative step (adapts from here)")
    p.add_argument("--memory-budget", metavar="BYTES|PERCENT",
                   help="memory for weights, e.g. 2000000000 or 50%%; when the weights exceed it, layers stream from storage")
    p.add_argument("--expert-cache", choices=("lfu", "lru"), default="lfu",
                   help="MoE bundles over the memory budget: which routed experts the cache keeps (default lfu)")
    add_device_options(p)


def register(sub) -> None:
    p = sub.add_parser("run", help="generate text from a bundle, streamed to the terminal")
    _load_options(p)
    p.add_argument("--prompt", required=True, help="prompt text (with --chat: the user message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the bundle's chat template (DeepSeek-R1)")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--hide-reasoning", action="store_true", help="with --chat: do not print the <think> part")
    p.add_argument("--max-tokens", type=int_at_least(1), default=128)
    p.add_argument("--temperature", type=number_in(0, why=" (0 is greedy)"), default=0.0)
    p.add_argument("--top-p", type=number_in(0, 1, low_open=True, why=" (1 turns it off)"), default=1.0)
    p.add_argument("--top-k", type=int_at_least(0), default=0)
    p.add_argument("--repetition-penalty", type=number_in(0, low_open=True, why=" (1 turns it off)"), default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=run)

    b = sub.add_parser("bench", help="measure prefill/decode speed, time to first token, memory, roofline ratio")
    _load_options(b)
    b.add_argument("--prompt-tokens", type=int_at_least(1), default=128)
    b.add_argument("--new-tokens", type=int_at_least(1), default=128)
    b.add_argument("--batch", type=int_at_least(1), default=1)
    b.add_argument("--repeats", type=int_at_least(1), default=3)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=bench)


def _load(args, max_batch: int = 1):
    from edge_sdk.runtime import load

    kw = dict(provider=args.provider, threads=args.threads, accuracy_level=args.accuracy_level,
              max_seq_len=args.max_seq_len, public_key=args.key, board=args.board,
              emulate=None if args.board else args.emulate, root=args.root,
              memory_budget=args.memory_budget, graph=args.graph, huge_pages=not args.no_huge_pages,
              expert_cache=args.expert_cache)
    model = load(args.bundle, max_batch=max_batch, **kw)
    if getattr(args, "draft", None):
        model.attach_draft(load(args.draft, **kw))
    return model


def _speculative(args):
    """The `speculative=` setting the flags ask for (None: off)."""
    if getattr(args, "prompt_lookup", False):
        return {"prompt_lookup": True, "k": args.spec_k}
    if getattr(args, "draft", None):
        return {"k": args.spec_k}
    return None


def run(args) -> int:
    model = _load(args)
    prompt = args.prompt
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    kw = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop, speculative=_speculative(args))
    if args.json:
        c = model.generate(prompt, **kw)
        t = c.timings
        print_json({"text": c.text, "reasoning": c.reasoning, "finish_reason": c.finish_reason, "token_ids": c.token_ids,
                    "prompt_tokens": c.prompt_tokens, "provider": model.backend.provider,
                    "time_to_first_token_s": t.first_token_s, "decode_tokens_per_s": t.decode_tokens_per_s})
        return 0
    in_reasoning = False
    for chunk in model.generate(prompt, stream=True, **kw):
        reasoning = getattr(chunk, "reasoning", False)
        if reasoning and args.hide_reasoning:
            continue
        if reasoning != in_reasoning and sys.stdout.isatty():
            sys.stdout.write("\033[2m" if reasoning else "\033[0m")
        in_reasoning = reasoning
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    if in_reasoning and sys.stdout.isatty():
        sys.stdout.write("\033[0m")
    sys.stdout.write("\n")
    t = model.last_timings
    spec = "" if t.acceptance_rate is None else f", {t.acceptance_rate:.0%} of draft tokens accepted"
    print(f"[{model.backend.provider}: {t.generated_tokens} tokens, first after {t.first_token_s * 1000:.0f} ms, "
          f"decode {t.decode_tokens_per_s:.1f} tokens/s{spec}]", file=sys.stderr)
    return 0


def bench(args) -> int:
    from edge_sdk.runtime.generate.bench import bench as run_bench
    from edge_sdk.runtime.generate.bench import board_roofline, roofline_share_text

    import time

    start = time.perf_counter()
    model = _load(args, max_batch=args.batch)  # verify, build what the device builds (fused graph), load
    load_s = time.perf_counter() - start
    result = run_bench(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, batch=args.batch, repeats=args.repeats)
    result["load_s"] = round(load_s, 3)
    if _speculative(args) is not None:
        result["speculative"] = _bench_speculative(model, _speculative(args), args.new_tokens)
    board = args.board or args.emulate
    if board:
        result["board_roofline"] = board_roofline(model.manifest, board, args.prompt_tokens + args.new_tokens)
    if args.json:
        print_json(result)
        return 0
    d = result["backend"]
    print(f"provider          {d['provider']} ({d.get('providers', [d['provider']])}, threads {d.get('threads')}, "
          f"accuracy level {d.get('accuracy_level')})")
    if d.get("graph_form"):
        print(f"graph             {d.get('graph', '')} ({d['graph_form']})")
    if d.get("huge_pages"):
        hp = d["huge_pages"]
        print(f"huge pages        {hp['collapsed_bytes'] / 2**20:.0f} of {hp['advised_bytes'] / 2**20:.0f} MiB advised "
              f"now huge (THP mode {hp['mode']}){', still converting' if hp.get('collapsing') else ''}"
              f"{', converted in %.1f s' % hp['collapse_s'] if hp.get('collapse_s') else ''}"
              f"{'; ' + hp['reason'] if hp.get('reason') else ''}")
    print(f"load              {result['load_s']:.2f} s (bundle verified, graph built or found, session created)")
    print(f"prompt/new/batch  {args.prompt_tokens}/{args.new_tokens}/{args.batch}, median of {args.repeats}")
    print(f"prefill           {result['prefill_tokens_per_s']:.1f} tokens/s")
    print(f"decode            {result['decode_tokens_per_s']:.1f} tokens/s")
    print(f"first token       {result['time_to_first_token_s'] * 1000:.0f} ms")
    if d.get("paging"):
        pg = d["paging"]
        print(f"paging            {len(pg['paged_layers'])} layers streamed ({d['io']}), {len(pg['resident_layers'])} resident, "
              f"{pg['bytes_paged_per_token'] / 2**20:.1f} MiB paged per token")
    print(f"peak memory       {result['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"read per token    {result['bytes_read_per_token'] / 2**20:.1f} MiB")
    print(f"roofline          {result['roofline_tokens_per_s']:.1f} tokens/s at {result['read_bandwidth_gbps']:.1f} GB/s "
          f"(probed) -> decode {roofline_share_text(result['roofline_ratio'])}")
    if "board_roofline" in result:
        r = result["board_roofline"]
        modes = ", ".join(f"{k} {v}" for k, v in r["modes"].items())
        print(f"board roofline    {r['board']}: {modes} tokens/s (planner)")
    if "speculative" in result:
        r = result["speculative"]
        print(f"speculative       {r['decode_tokens_per_s']:.1f} vs {r['plain_decode_tokens_per_s']:.1f} tokens/s plain "
              f"(x{r['speedup']:.2f}), {r['acceptance_rate']:.0%} of {r['proposed']} draft tokens accepted, same output: {r['same_output']}")
    print(f"load average      {' '.join(f'{x:.2f}' for x in result['load_average'])}")
    return 0


SPEC_PROMPT = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n" * 4


def _bench_speculative(model, spec, new_tokens: int) -> dict:
    """Greedy decode of one repetitive code prompt without and with speculation, side by side."""
    plain = model.generate(SPEC_PROMPT, max_new_tokens=new_tokens, speculative=False, ignore_eos=True)
    fast = model.generate(SPEC_PROMPT, max_new_tokens=new_tokens, speculative=spec, ignore_eos=True)
    a, b = plain.timings, fast.timings
    return {"decode_tokens_per_s": b.decode_tokens_per_s, "plain_decode_tokens_per_s": a.decode_tokens_per_s,
            "speedup": b.decode_tokens_per_s / a.decode_tokens_per_s if a.decode_tokens_per_s else 0.0,
            "acceptance_rate": b.acceptance_rate or 0.0, "proposed": b.spec_proposed, "same_output": plain.token_ids == fast.token_ids}
