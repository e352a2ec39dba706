"""The daemon's config file, hostile: any table of TOML values parses to settings that hold what was
written, or is refused in one line (ConfigError); a config path that is a directory or a file that is
not text is one line too, also on reload."""

from __future__ import annotations

import math

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.runtime.server.config import ServeConfig, load_config, parse_config


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.write_bytes(b"\xff\xfe[server]\x00\x81")])
def test_a_config_path_that_is_not_a_text_file_is_one_line(tmp_path, make):
    path = tmp_path / "edge-sdk.toml"
    make(path)
    with pytest.raises(ConfigError, match=str(path)) as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_any_toml_table_is_settings_as_written_or_one_line():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    # what TOML can hold: 64-bit integers, floats with inf and nan, strings, booleans, arrays, tables
    scalar = st.integers(-2 ** 63, 2 ** 63 - 1) | st.integers(-3, 20) | st.floats() | st.booleans() | st.text(max_size=6)
    value = scalar | st.lists(scalar, max_size=2) | st.dictionaries(st.text(max_size=3), scalar, max_size=2)
    names = {"server": ["port", "max_request_bytes", "max_tokens_default", "context_length", "drain_timeout_s", "log_level", "host"],
             "scheduler": ["max_batch", "max_queue", "when_full", "queue_timeout_s", "retry_after_s"],
             "memory": ["reserve_mb", "kv_block_tokens", "kv_pool_max_mb", "workspace_mb", "weights_budget"],
             "telemetry": ["interval_s", "port_url"], "speculative": ["draft", "prompt_lookup", "k", "ngram"]}
    section = st.sampled_from(sorted(names)).flatmap(
        lambda s: st.tuples(st.just(s), st.dictionaries(st.sampled_from(names[s]), value, max_size=3)))

    @hypothesis.given(st.lists(section, max_size=3))
    @hypothesis.settings(max_examples=400, deadline=None)
    def check(parts):
        raw = {s: t for s, t in parts}
        try:
            cfg = parse_config(raw)
        except ConfigError as e:
            assert "\n" not in str(e)
            return
        assert isinstance(cfg, ServeConfig)
        for s, table in raw.items():
            for key, v in table.items():
                got = getattr(getattr(cfg, s), key)
                assert got == v or (isinstance(v, float) and math.isnan(v) and math.isnan(got)), (s, key)
        assert 1 <= cfg.speculative.k <= 16 and not (cfg.speculative.draft and cfg.speculative.prompt_lookup)

    check()
