"""Daemon lifecycle: load, listen, READY, watchdog, SIGHUP reload, SIGTERM drain, exit 0.

SIGTERM (or SIGINT): STOPPING=1, new requests get 503, in-flight ones run until
server.drain_timeout_s and are then cancelled (their streams end with finish_reason "abort" and
[DONE]), the HTTP server closes, telemetry is flushed, exit status 0. A second SIGTERM cuts the
drain short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ...errors import ConfigError
from .api import ServerState, create_app
from .structured import warm as warm_grammar
from .config import ServeConfig, load_config, reload_changes
from .memory import MemoryManager, plan_layout, process_rss_bytes
from .metrics import Metrics
from .scheduler import Scheduler, server_speculation
from .systemd import Notifier

log = logging.getLogger("edge_sdk.serve")


@dataclass
class Service:
    """Everything built from a config: the HTTP state (model, memory, scheduler) and where it came from."""

    config: ServeConfig
    state: ServerState
    budget_source: str


def build_service(config: ServeConfig, model=None) -> Service:
    """Load the bundle (unless a StepModel is given), split the memory budget, create the scheduler."""
    from .budget import memory_budget_bytes, power_mode_reader

    load_rss = 0
    if model is None:
        before = process_rss_bytes()
        model = load_bundle_model(config)
        load_rss = process_rss_bytes() - before
        log.info("model loaded: resident memory grew %d MiB; accounted weights %d MiB, KV %d B/token",
                 load_rss >> 20, model.weights_bytes >> 20, model.kv_bytes_per_token)
    s, q, m = config.server, config.scheduler, config.memory
    # what loading really cost counts when it exceeds the files (e.g. tensors widened at load)
    weights = max(model.weights_bytes, load_rss)
    context = min(s.context_length or model.context_length, model.context_length)
    budget, source = memory_budget_bytes(config.root or None, config.emulate or None)
    layout = plan_layout(
        budget_bytes=budget, reserve_bytes=m.reserve_mb * 2**20, weights_bytes=weights,
        workspace_bytes=m.workspace_mb * 2**20 if m.workspace_mb else model.workspace_bytes,
        kv_bytes_per_token=model.kv_bytes_per_token, kv_block_tokens=m.kv_block_tokens, context_length=context,
        kv_pool_max_bytes=m.kv_pool_max_mb * 2**20 if m.kv_pool_max_mb else None)
    memory = MemoryManager(layout, context_length=context)
    metrics = Metrics()
    scheduler = Scheduler(model, memory, max_batch=q.max_batch, max_queue=q.max_queue, when_full=q.when_full,
                          queue_timeout_s=q.queue_timeout_s, retry_after_s=q.retry_after_s, metrics=metrics,
                          speculative=server_speculation(config.speculative, model), speculative_k=config.speculative.k)
    state = ServerState(model=model, scheduler=scheduler, memory=memory, metrics=metrics,
                        model_id=s.model_name or model.model_id, api_key=config.api_key(),
                        max_request_bytes=s.max_request_bytes, max_tokens_default=s.max_tokens_default,
                        power_mode=power_mode_reader(config.root or None, config.emulate or None),
                        extra_gauges=lambda: {"model_load_resident_bytes": ("Resident memory the process gained loading the model.", load_rss)})
    return Service(config, state, source)


def check_bundle_dir(config: ServeConfig) -> None:
    if not config.bundle:
        raise ConfigError("no bundle to serve", hint="pass --bundle DIR or set bundle = \"...\" in the config file")
    if not Path(config.bundle).is_dir():
        raise ConfigError(f"bundle {config.bundle} is not a directory", hint="pass the directory `edge-sdk convert` wrote")
    draft = config.speculative.draft
    if draft and not Path(draft).is_dir():  # before the target loads, which takes minutes for a large model
        raise ConfigError(f"draft bundle {draft} is not a directory", hint="pass --draft the directory `edge-sdk convert` wrote for the draft")


def load_bundle_model(config: ServeConfig):
    from ... import load
    from .adapter import BundleStepModel

    check_bundle_dir(config)
    options = {"max_batch": config.scheduler.max_batch}
    if config.bundle_key:
        options["public_key"] = config.bundle_key
    if config.emulate:
        options["emulate"] = config.emulate
    if config.root:
        options["root"] = config.root
    if config.server.context_length:
        options["max_seq_len"] = config.server.context_length
    if config.memory.weights_budget:
        options["memory_budget"] = config.memory.weights_budget
    draft = config.speculative.draft or None
    return BundleStepModel(load(config.bundle, draft=draft, **options), max_batch=config.scheduler.max_batch)


def apply_reload(service: Service, new: ServeConfig) -> tuple[dict, list[str]]:
    """Apply the reloadable part of `new`; returns (applied, needs restart)."""
    applied, restart = reload_changes(service.config, new)
    st, sch = service.state, service.state.scheduler
    st.api_key = new.api_key()
    st.max_request_bytes, st.max_tokens_default = new.server.max_request_bytes, new.server.max_tokens_default
    sch.max_queue, sch.when_full = new.scheduler.max_queue, new.scheduler.when_full
    sch.queue_timeout_s, sch.retry_after_s = new.scheduler.queue_timeout_s, new.scheduler.retry_after_s
    logging.getLogger("edge_sdk").setLevel(new.server.log_level.upper())
    # keep what needs a restart as it runs now, so the next reload compares against reality
    kept = {k: getattr(service.config, k) for k in ("bundle", "emulate", "root", "memory", "telemetry", "speculative")}
    server = replace(new.server, host=service.config.server.host, port=service.config.server.port,
                     context_length=service.config.server.context_length, model_name=service.config.server.model_name)
    scheduler = replace(new.scheduler, max_batch=service.config.scheduler.max_batch)
    service.config = replace(new, server=server, scheduler=scheduler, **kept)
    return applied, restart


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}", hint="pick another --port or stop the other service") from exc
    sock.set_inheritable(True)
    return sock


def check_listen(host: str, port: int) -> None:
    """Raise ConfigError now when host:port cannot be bound (the model load that follows can take minutes).
    Port 0 always binds; the socket is closed again so that nothing queues on it during the load."""
    if port:
        bind_socket(host, port).close()


class Daemon:
    def __init__(self, service: Service, config_path: str | None = None, *, notifier: Notifier | None = None, telemetry=None,
                 argv_overrides: dict | None = None):
        self.service = service
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.telemetry = telemetry
        self.argv_overrides = argv_overrides or {}
        self.server = None
        self._stopping: asyncio.Task | None = None
        self._terms = 0

    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        import uvicorn

        cfg = self.service.config
        sock = bind_socket(cfg.server.host, cfg.server.port)
        host, port = sock.getsockname()[:2]
        ucfg = uvicorn.Config(create_app(self.service.state), log_level=cfg.server.log_level, access_log=False,
                              lifespan="off", timeout_graceful_shutdown=int(cfg.server.drain_timeout_s) + 5, server_header=False)
        self.server = _Server(ucfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_terminate, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        self.service.state.scheduler.start()
        warm_grammar(self.service.state.model)  # the first constrained request does not wait for the tokenizer view
        serving = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started and not serving.done():
            await asyncio.sleep(0.02)
        if self.server.started:
            url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
            print(f"edge-sdk serve: listening on {url} (model {self.service.state.model_id})", flush=True)
            self.notifier.ready(f"serving {self.service.state.model_id} on {url}")
            self._telemetry_event("serve_start", model=self.service.state.model_id, url=url)
        watchdog = asyncio.create_task(self._watchdog())
        telemetry = asyncio.create_task(self._telemetry()) if self.telemetry is not None else None
        try:
            await serving
        finally:
            watchdog.cancel()
            if telemetry:
                telemetry.cancel()
            self.service.state.scheduler.stop()
            sock.close()
            await self._flush_telemetry()
        log.info("stopped")
        return 0

    def _on_terminate(self, sig: int) -> None:
        self._terms += 1
        if self._stopping is None:
            log.info("%s: draining (up to %.0f s)", signal.Signals(sig).name, self.service.config.server.drain_timeout_s)
            self.notifier.stopping("draining")
            self._telemetry_event("serve_stop", signal=signal.Signals(sig).name)
            self._stopping = asyncio.create_task(self._drain(self.service.config.server.drain_timeout_s))
        else:
            log.info("second %s: cancelling in-flight requests now", signal.Signals(sig).name)
            self.service.state.scheduler.drain(0)

    async def _drain(self, timeout_s: float) -> None:
        clean = await asyncio.to_thread(self.service.state.scheduler.drain, timeout_s)
        log.info("in-flight requests %s", "finished" if clean else "cancelled at the drain deadline")
        self.server.should_exit = True

    def _on_reload(self) -> None:
        if self.config_path is None:
            log.info("SIGHUP: no config file to reload")
            return
        self.notifier.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
        try:
            new = load_config(self.config_path).with_overrides(**self.argv_overrides)
            applied, restart = apply_reload(self.service, new)
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded, keeping the running one: %s", exc)
        else:
            log.info("SIGHUP: reloaded %s: applied %s%s", self.config_path, ", ".join(applied) or "nothing",
                     f"; needs a restart: {', '.join(restart)}" if restart else "")
        self.notifier.ready("serving")

    async def _watchdog(self, check_s: float = 0.5) -> None:
        """WATCHDOG=1 every interval while the scheduler loops; at its failure, WATCHDOG=trigger within
        check_s and no ping after (systemd then restarts the service)."""
        interval = self.notifier.watchdog_interval_s
        if not interval:
            return
        stale_after = max(2 * interval, 30.0)
        next_ping = 0.0
        while True:
            scheduler = self.service.state.scheduler
            if scheduler.failure:
                log.critical("the scheduler stopped (%s): watchdog pings stop, asking systemd to restart", scheduler.failure)
                self.notifier.notify(WATCHDOG="trigger", STATUS=f"scheduler stopped: {scheduler.failure}")
                return
            now = time.monotonic()
            if now >= next_ping:
                next_ping = now + interval
                age = now - scheduler.heartbeat
                if age < stale_after:
                    self.notifier.watchdog()
                else:
                    log.error("scheduler has not looped for %.0f s: withholding the watchdog ping", age)
            await asyncio.sleep(min(check_s, interval))

    async def _telemetry(self) -> None:
        """Keep the uplink's view of the daemon current; the uplink samples it every telemetry.interval_s."""
        while True:
            for name, value in self.snapshot().items():
                self.telemetry.telemetry.record_metric(name, value)
            await asyncio.sleep(min(1.0, self.service.config.telemetry.interval_s))

    def _telemetry_event(self, kind: str, **fields) -> None:
        if self.telemetry is None:
            return
        try:
            self.telemetry.telemetry.event(kind, **fields)
        except Exception as exc:  # the uplink must never take the API down
            log.warning("telemetry event %s not stored: %s", kind, exc)

    def snapshot(self) -> dict:
        st = self.service.state
        mem = st.memory.stats()
        return {"decode_tokens_per_s": round(st.metrics.decode_tokens_per_s(), 3), "queue_depth": st.scheduler.queue_depth(),
                "running": st.scheduler.running(), "kv_usage": round(mem["kv_blocks_used"] / max(1, mem["kv_blocks_total"]), 4),
                "generation_tokens_total": st.metrics.generation_tokens, "requests_rejected_total": st.metrics.rejected,
                "ttft_count": st.metrics.ttft.count, "ttft_sum_s": round(st.metrics.ttft.sum, 4), "power_mode": st.power_mode()}

    async def _flush_telemetry(self) -> None:
        if self.telemetry is None:
            return
        for name, value in self.snapshot().items():
            self.telemetry.telemetry.record_metric(name, value)
        self.telemetry.telemetry.sample()
        flushed = await asyncio.to_thread(self.telemetry.stop, 5.0)
        log.info("telemetry %s", "flushed: every record acknowledged" if flushed else "stopped with records left in its queue (sent after restart)")


class _Server:
    """uvicorn.Server without its own signal handling (the daemon drains first, then stops it)."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        return Server(config)


def setup_logging(level: str = "info") -> None:
    """Plain lines on stdout: journald adds time, unit and priority."""
    logging.basicConfig(level=level.upper(), stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s", force=True)
