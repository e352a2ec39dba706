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
    for got, want in zip(data["modes"], ref.modes):  # the estimate and its bound, both
        assert (got["decode_tokens_per_s"], got["decode_bound_tokens_per_s"]) == (want.decode_tokens_per_s, want.decode_bound_tokens_per_s)
        assert got["decode_tokens_per_s"] < got["decode_bound_tokens_per_s"]


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


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`edge-sdk plan --json ... | head`: the closed pipe is no traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout fails with EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "edge_sdk.cli.main", "plan", "deepseek-r1-distill-qwen-1.5b", "--json"],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.stderr == "" and r.returncode == 141


@pytest.mark.parametrize("args, flag", [
    (["run", "B", "--prompt", "x", "--max-tokens", "-1"], "--max-tokens: must be >= 1"),
    (["run", "B", "--prompt", "x", "--max-tokens", "0"], "--max-tokens: must be >= 1"),
    (["run", "B", "--prompt", "x", "--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["run", "B", "--prompt", "x", "--temperature", "-0.5"], "--temperature: must be >= 0"),
    (["run", "B", "--prompt", "x", "--top-k", "-2"], "--top-k: must be >= 0"),
    (["run", "B", "--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty: must be > 0"),
    (["run", "B", "--prompt", "x", "--threads", "0"], "--threads: must be >= 1"),
    (["bench", "B", "--new-tokens", "0"], "--new-tokens: must be >= 1"),
    (["bench", "B", "--prompt-tokens", "-3"], "--prompt-tokens: must be >= 1"),
    (["bench", "B", "--batch", "0"], "--batch: must be >= 1"),
    (["bench", "B", "--repeats", "0"], "--repeats: must be >= 1"),
    (["bench", "B", "--max-seq-len", "1"], "--max-seq-len: must be >= 2"),
    (["device", "boot-check", "--max-boots", "0"], "--max-boots: must be >= 1"),
    (["device", "health", "--health-timeout", "0"], "--health-timeout: must be > 0"),
])
def test_run_and_bench_flags_are_checked_before_the_model_loads(args, flag, capsys, monkeypatch):
    import edge_sdk.runtime

    monkeypatch.setattr(edge_sdk.runtime, "load", lambda *a, **k: pytest.fail("loaded before checking the flags"))
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["listen", "uplink"])
def test_a_binary_key_file_gives_one_line_naming_keygen(tmp_path, verb):
    key = tmp_path / "key"
    key.write_bytes(b"\xff\xfe\x80" + bytes(range(29)))  # `head -c 32 /dev/urandom`: not UTF-8, not hex
    r = cli("telemetry", verb, "loop://", "--key", str(key), "--state-dir" if verb == "uplink" else "--out",
            str(tmp_path / "s"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "hex" in r.stderr and "edge-sdk telemetry keygen" in r.stderr
