"""The `edge-sdk` command: registered subcommands, JSON output, one-line errors."""

import json
import subprocess
import sys

import pytest

from edge_sdk.cli.main import COMMANDS, main

DESIGN_COMMANDS = ["convert", "plan", "run", "serve", "engine", "verify", "doctor", "power", "emulate", "telemetry", "bench", "device"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_sdk.cli.main", *args], capture_output=True, text=True, timeout=120)


def test_every_contract_command_is_registered():
    assert set(DESIGN_COMMANDS) <= set(COMMANDS)
    out = cli("--help").stdout
    for name in DESIGN_COMMANDS:
        assert name in out


def test_version():
    from edge_sdk import __version__

    r = cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_plan_json_matches_the_python_api():
    from edge_sdk import plan

    r = cli("plan", "deepseek-r1-distill-qwen-1.5b", "--board", "orin-nx-16gb", "--context", "2048", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    ref = plan("deepseek-r1-distill-qwen-1.5b", "orin-nx-16gb", context=2048)
    assert data["params"]["total"] == 1_777_088_000
    assert data["total_bytes"] == ref.total_bytes and data["fits"] is True
    assert [m["mode"] for m in data["modes"]] == ["MAXN", "MODE_10W", "MODE_15W", "MODE_25W"]


def test_plan_recommend(capsys):
    assert main(["plan", "deepseek-r1-distill-qwen-32b", "--recommend"]) == 0
    out = capsys.readouterr().out
    assert "agx-orin-64gb" in out and "orin-nano-8gb" not in out


@pytest.mark.parametrize(
    "content, expect",
    [
        ("{not json", "not valid JSON"),
        ('{"architectures": ["GPT2LMHeadModel"]}', "not supported"),
        ('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}', "num_attention_heads"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_config_gives_one_clear_line(tmp_path, content, expect):
    cfg = tmp_path / "config.json"
    cfg.write_text(content)
    r = cli("plan", str(cfg))
    assert r.returncode == 2
    assert expect in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text("{not json")
    r = cli("--debug", "plan", str(cfg))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_unknown_board_lists_boards():
    r = cli("plan", "deepseek-r1-distill-qwen-1.5b", "--board", "xavier")
    assert r.returncode == 2 and "orin-nano-8gb" in r.stderr
