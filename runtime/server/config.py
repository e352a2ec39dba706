"""Daemon settings: one TOML file (default: jetson/edge-sdk.toml), validated once into dataclasses.

Command-line options override the file. SIGHUP re-reads the file; fields in RELOADABLE take effect
at once, the others need a restart (the daemon says which).
"""

from __future__ import annotations

try:
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6 / Ubuntu 22.04)
    import tomli as tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ...errors import ConfigError

WHEN_FULL = ("wait", "reject")


@dataclass(frozen=True)
class ServerSection:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str = ""  # empty: no key (localhost only)
    api_key_file: str = ""  # read the key from this file instead (e.g. a systemd credential)
    max_request_bytes: int = 1_048_576
    max_tokens_default: int = 256
    context_length: int = 0  # 0: the model's own context
    model_name: str = ""  # id shown in /v1/models; empty: the bundle's model name
    drain_timeout_s: float = 20.0  # SIGTERM: finish in-flight requests for this long, then cancel
    log_level: str = "info"


@dataclass(frozen=True)
class SchedulerSection:
    max_batch: int = 8  # sequences decoded together in one step
    max_queue: int = 64  # waiting requests beyond this get 503
    when_full: str = "wait"  # "wait" in the queue (up to queue_timeout_s) or "reject" with 503 at once
    queue_timeout_s: float = 30.0
    retry_after_s: int = 2


@dataclass(frozen=True)
class MemorySection:
    reserve_mb: int = 1024  # kept free for the OS and other processes
    kv_block_tokens: int = 16
    kv_pool_max_mb: int = 0  # 0: everything left after weights and workspace
    workspace_mb: int = 0  # 0: estimated from the model shape
    weights_budget: str = ""  # bytes or "50%" of the weights; over it layers stream from storage (docs/paging.md)


@dataclass(frozen=True)
class SpeculativeSection:
    draft: str = ""  # draft bundle (same tokenizer, smaller): speculate with it while one sequence runs
    prompt_lookup: bool = False  # speculate with n-grams copied from the sequence itself instead
    k: int = 4  # draft tokens per step to start with; adapts between 1 and 8


@dataclass(frozen=True)
class TelemetrySection:
    port_url: str = ""  # empty: no uplink; e.g. /dev/ttyTHS0, socket://host:port
    key_file: str = ""  # pre-shared key (hex), from `edge-sdk telemetry keygen FILE`
    state_dir: str = ""  # persistent queue; empty: /var/lib/edge-sdk for the service
    interval_s: float = 5.0


@dataclass(frozen=True)
class ServeConfig:
    server: ServerSection = field(default_factory=ServerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    memory: MemorySection = field(default_factory=MemorySection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    speculative: SpeculativeSection = field(default_factory=SpeculativeSection)
    bundle: str = ""
    bundle_key: str = ""  # trusted ed25519 public key file: manifest.sig must verify against it; empty: hashes only
    emulate: str = ""
    root: str = ""

    def __post_init__(self):
        s, q, m = self.server, self.scheduler, self.memory
        _check(0 <= s.port <= 65535, f"server.port {s.port} is outside 0-65535")
        _check(s.max_request_bytes >= 1024, f"server.max_request_bytes {s.max_request_bytes} is below 1024")
        _check(s.max_tokens_default >= 1, "server.max_tokens_default must be >= 1")
        _check(s.context_length >= 0, "server.context_length must be >= 0 (0 = the model's)")
        _check(s.drain_timeout_s >= 0, "server.drain_timeout_s must be >= 0")
        _check(s.log_level in ("debug", "info", "warning", "error"), f"server.log_level {s.log_level!r} is not debug, info, warning or error")
        _check(1 <= q.max_batch <= 256, f"scheduler.max_batch {q.max_batch} is outside 1-256")
        _check(q.max_queue >= 0, "scheduler.max_queue must be >= 0")
        _check(q.when_full in WHEN_FULL, f"scheduler.when_full {q.when_full!r} is not one of {', '.join(WHEN_FULL)}")
        _check(q.queue_timeout_s > 0 and q.retry_after_s >= 1, "scheduler.queue_timeout_s must be > 0 and retry_after_s >= 1")
        _check(m.reserve_mb >= 0 and m.kv_pool_max_mb >= 0 and m.workspace_mb >= 0, "memory sizes must be >= 0")
        _check(m.kv_block_tokens in (8, 16, 32, 64, 128), f"memory.kv_block_tokens {m.kv_block_tokens} is not 8, 16, 32, 64 or 128")
        _check(self.telemetry.interval_s > 0, "telemetry.interval_s must be > 0")
        sp = self.speculative
        _check(not (sp.draft and sp.prompt_lookup), "speculative.draft and speculative.prompt_lookup exclude each other")
        _check(1 <= sp.k <= 16, f"speculative.k {sp.k} is outside 1-16")

    def api_key(self) -> str:
        if self.server.api_key_file:
            try:
                return Path(self.server.api_key_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"server.api_key_file {self.server.api_key_file}: {exc.strerror}", hint="create it or unset the option") from exc
        return self.server.api_key

    def with_overrides(self, **dotted) -> "ServeConfig":
        """Apply command-line values given as section_field=value (None values are skipped)."""
        sections = {f.name: getattr(self, f.name) for f in fields(self)}
        top = {}
        for key, value in dotted.items():
            if value is None:
                continue
            section, _, name = key.partition("_") if key.split("_", 1)[0] in ("server", "scheduler", "memory", "telemetry", "speculative") else ("", "", key)
            if section:
                sections[section] = replace(sections[section], **{name: value})
            else:
                top[key] = value
        return replace(self, **(sections | top))

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["server"]["api_key"]:
            d["server"]["api_key"] = "***"
        return d


# fields SIGHUP applies without a restart
RELOADABLE = {
    "server": {"api_key", "api_key_file", "max_request_bytes", "max_tokens_default", "drain_timeout_s", "log_level"},
    "scheduler": {"max_queue", "when_full", "queue_timeout_s", "retry_after_s"},
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message, hint="fix the config file or the command-line option")


def _section(cls, raw, name: str, path: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [{name}]: {', '.join(unknown)}", hint=f"known keys: {', '.join(known)}")
    out = {}
    for key, value in raw.items():
        want = type(getattr(cls(), key))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want:
            raise ConfigError(f"{path}: {name}.{key} must be a {want.__name__}, got {value!r}")
        out[key] = value
    return cls(**out)


def parse_config(raw: dict, path: str = "<config>") -> ServeConfig:
    sections = {"server": ServerSection, "scheduler": SchedulerSection, "memory": MemorySection, "telemetry": TelemetrySection,
                "speculative": SpeculativeSection}
    top = {"bundle", "bundle_key", "emulate", "root"}
    unknown = sorted(set(raw) - set(sections) - top)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) or key(s): {', '.join(unknown)}", hint=f"known: {', '.join([*sections, *top])}")
    for key in top & set(raw):
        if not isinstance(raw[key], str):
            raise ConfigError(f"{path}: {key} must be a string")
    return ServeConfig(**{k: _section(cls, raw.get(k), k, path) for k, cls in sections.items()}, **{k: raw[k] for k in top & set(raw)})


def load_config(path: str | Path | None) -> ServeConfig:
    if path is None:
        return ServeConfig()
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {p} does not exist", hint="pass --config with an existing file; the default is jetson/edge-sdk.toml") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:  # a directory, unreadable, or not UTF-8 text
        raise ConfigError(f"config file {p} cannot be read ({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc})",
                          hint="pass --config a readable UTF-8 TOML file") from None
    return parse_config(raw, str(p))


def reload_changes(old: ServeConfig, new: ServeConfig) -> tuple[dict, list[str]]:
    """(fields applied now, fields that need a restart) between two configs."""
    applied, restart = {}, []
    for section in ("server", "scheduler", "memory", "telemetry", "speculative"):
        a, b = getattr(old, section), getattr(new, section)
        for f in fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                if f.name in RELOADABLE.get(section, ()):
                    applied[f"{section}.{f.name}"] = getattr(b, f.name)
                else:
                    restart.append(f"{section}.{f.name}")
    for key in ("bundle", "bundle_key", "emulate", "root"):
        if getattr(old, key) != getattr(new, key):
            restart.append(key)
    return applied, restart
