"""`edge-sdk serve` options: config file + command line merge, and errors before anything loads."""

from __future__ import annotations

import json

from edge_sdk.cli.main import main


def test_print_config_merges_file_and_options(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('bundle = "/b"\n[server]\nport = 9000\napi_key = "k"\n[scheduler]\nmax_batch = 2\n')
    assert main(["serve", "--config", str(cfg), "--port", "0", "--max-batch", "4", "--emulate", "orin-nano-8gb", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["bundle"], out["emulate"], out["server"]["port"], out["scheduler"]["max_batch"]) == ("/b", "orin-nano-8gb", 0, 4)
    assert out["server"]["api_key"] == "***"


def test_a_board_the_config_file_emulates_gets_its_root_from_the_user_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "c.toml"
    cfg.write_text('bundle = "/b"\nemulate = "orin-nano-8gb"\n')
    assert main(["serve", "--config", str(cfg), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["root"] == str(tmp_path / "cache/emulated/orin-nano-8gb")


def test_missing_bundle_and_bad_config_fail_with_one_line(tmp_path, capsys):
    assert main(["serve", "--port", "0"]) == 2
    assert "no bundle to serve" in capsys.readouterr().err
    assert main(["serve", "--bundle", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[scheduler]\nwhen_full = \"maybe\"\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "when_full 'maybe'" in capsys.readouterr().err
