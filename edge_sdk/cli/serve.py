"""`edge-sdk serve --bundle BUNDLE`: the OpenAI-compatible device daemon."""

from __future__ import annotations

import os

from ._common import bundle_path
from .main import add_device_options


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible local API daemon (chat, completions, streaming, /metrics)",
                       description="Serve a bundle over an OpenAI-compatible HTTP API. SIGTERM drains, SIGHUP reloads the config.")
    p.add_argument("--bundle", help="bundle directory (or `bundle` in the config file)")
    p.add_argument("--config", default=os.environ.get("EDGE_SDK_CONFIG"),
                   help="TOML config file (default: built-in defaults; the device uses /etc/edge-sdk/edge-sdk.toml); env EDGE_SDK_CONFIG")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1: this device only)")
    p.add_argument("--port", type=int, help="TCP port (default 8080; 0 picks a free one)")
    p.add_argument("--key", metavar="PUB", help="trusted ed25519 public key: the bundle's manifest.sig must verify (bundle_key in the config)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or server.api_key / api_key_file in the config)")
    p.add_argument("--max-batch", type=int, help="sequences decoded together (scheduler.max_batch)")
    p.add_argument("--context", type=int, help="tokens per sequence (server.context_length; default: the model's)")
    p.add_argument("--memory-budget", metavar="BYTES|PERCENT",
                   help="memory for weights (memory.weights_budget); over it layers stream from storage")
    p.add_argument("--when-full", choices=("wait", "reject"), help="a request that does not fit now waits or gets 503")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft", metavar="BUNDLE", type=bundle_path, help="speculative decoding with this smaller bundle (same tokenizer) "
                      "while one request runs ([speculative] draft)")
    spec.add_argument("--prompt-lookup", action="store_true", default=None,
                      help="speculative decoding with n-grams copied from the prompt while one request runs ([speculative] prompt_lookup)")
    p.add_argument("--spec-k", type=int, metavar="K", help="draft tokens per speculative step to start with, 1-16 ([speculative] k)")
    p.add_argument("--print-config", action="store_true", help="print the effective config as JSON and exit")
    add_device_options(p)
    p.set_defaults(func=run)


def overrides(args) -> dict:
    return {"bundle": args.bundle, "bundle_key": args.key, "emulate": args.emulate, "root": args.root, "server_host": args.host,
            "server_port": args.port, "server_api_key": args.api_key, "scheduler_max_batch": args.max_batch,
            "server_context_length": args.context, "scheduler_when_full": args.when_full,
            "memory_weights_budget": args.memory_budget, "speculative_draft": args.draft,
            "speculative_prompt_lookup": args.prompt_lookup, "speculative_k": args.spec_k}


def run(args) -> int:
    from edge_sdk.runtime.server.config import load_config
    from edge_sdk.runtime.server.daemon import Daemon, build_service, check_bundle_dir, check_listen, setup_logging

    argv = overrides(args)
    config = load_config(args.config).with_overrides(**argv)
    if config.emulate and not config.root:  # a board the config file emulates: its root resolved here, as for --emulate
        from .main import emulated_root

        config = config.with_overrides(root=emulated_root(config.emulate))
    if args.print_config:
        from ._common import print_json

        print_json(config.as_dict())
        return 0
    setup_logging("debug" if args.debug else config.server.log_level)
    check_bundle_dir(config)
    check_listen(config.server.host, config.server.port)  # before the load, which takes minutes for a large model
    service = build_service(config)
    lay = service.state.memory.layout
    import logging

    logging.getLogger("edge_sdk.serve").info(
        "memory: budget %d MiB (%s), reserve %d, weights %d, workspace %d, KV pool %d blocks x %d tokens (%d MiB)",
        lay.budget_bytes >> 20, service.budget_source, lay.reserve_bytes >> 20, lay.weights_bytes >> 20,
        lay.workspace_bytes >> 20, lay.kv_blocks, lay.kv_block_tokens, lay.kv_pool_bytes >> 20)
    if config.server.host not in ("127.0.0.1", "::1", "localhost") and not service.state.api_key:
        logging.getLogger("edge_sdk.serve").warning("listening on %s without an API key: anyone on the network can use the model", config.server.host)
    return Daemon(service, args.config, argv_overrides=argv, telemetry=telemetry_uplink(config)).run()


def telemetry_uplink(config):
    """The telemetry uplink when the config names a port; None otherwise."""
    from edge_sdk.runtime.server.telemetry_link import open_uplink

    from ._common import state_dir

    return open_uplink(config, state_dir(config.telemetry.state_dir or None))
