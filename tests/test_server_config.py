"""Daemon config: the shipped TOML equals the dataclass defaults, validation names the field, reload diff."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.runtime.server.config import ServeConfig, load_config, parse_config, reload_changes

SHIPPED = Path(__file__).resolve().parents[1] / "jetson" / "edge-sdk.toml"


def test_shipped_config_parses_to_the_defaults():
    cfg = load_config(SHIPPED)
    assert cfg.server == ServeConfig().server and cfg.scheduler == ServeConfig().scheduler
    assert cfg.memory == ServeConfig().memory and cfg.telemetry == ServeConfig().telemetry
    assert cfg.bundle == "/var/lib/edge-sdk/slots/current" and cfg.server.host == "127.0.0.1"


@pytest.mark.parametrize("raw,message", [
    ({"server": {"port": 70000}}, "server.port 70000"),
    ({"server": {"prot": 1}}, "unknown key.*prot.*known keys"),
    ({"server": {"port": "80"}}, "server.port must be a int"),
    ({"scheduler": {"when_full": "drop"}}, "when_full 'drop' is not one of wait, reject"),
    ({"scheduler": {"max_batch": 0}}, "max_batch 0 is outside 1-256"),
    ({"memory": {"kv_block_tokens": 10}}, "kv_block_tokens 10"),
    ({"memory": {"reserve_mb": -1}}, "memory sizes must be >= 0"),
    ({"sever": {}}, "unknown section.*sever"),
    ({"server": 3}, r"\[server\] must be a table"),
    ({"bundle": 5}, "bundle must be a string"),
])
def test_invalid_values_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, "test.toml")


def test_integers_are_accepted_for_float_fields_and_files_errors_are_clear(tmp_path):
    assert parse_config({"server": {"drain_timeout_s": 5}}).server.drain_timeout_s == 5.0
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_command_line_overrides_win_and_none_is_ignored():
    cfg = ServeConfig().with_overrides(server_port=0, server_api_key="k", scheduler_max_batch=4, bundle="b", emulate=None)
    assert (cfg.server.port, cfg.server.api_key, cfg.scheduler.max_batch, cfg.bundle, cfg.emulate) == (0, "k", 4, "b", "")
    with pytest.raises(ConfigError):
        ServeConfig().with_overrides(server_port=-1)
    assert cfg.as_dict()["server"]["api_key"] == "***"


def test_api_key_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("from-file\n")
    assert parse_config({"server": {"api_key_file": str(key)}}).api_key() == "from-file"
    with pytest.raises(ConfigError, match="api_key_file"):
        parse_config({"server": {"api_key_file": str(tmp_path / "none")}}).api_key()


def test_reload_changes_split_live_and_restart_fields():
    old = ServeConfig()
    new = parse_config({"server": {"api_key": "new", "port": 9000}, "scheduler": {"max_queue": 3, "max_batch": 2},
                        "memory": {"reserve_mb": 10}})
    applied, restart = reload_changes(old, new)
    assert applied == {"server.api_key": "new", "scheduler.max_queue": 3}
    assert sorted(restart) == ["memory.reserve_mb", "scheduler.max_batch", "server.port"]
