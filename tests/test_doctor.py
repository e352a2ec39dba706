"""`edge-sdk doctor`: each check passes, warns or fails with a fix, on emulated and hand-altered roots."""

import json
import re
import subprocess
import sys

import pytest

from edge_sdk.cli.main import main
from edge_sdk.runtime.platform import Platform, emulated_root
from edge_sdk.runtime.platform.doctor import DoctorOptions, run_checks
from edge_sdk.runtime.platform.storage_probe import probe_storage

FAST = dict(storage_seconds=0.3, storage_file_mb=8)


def by_name(checks):
    return {c.name: c for c in checks}


@pytest.fixture
def nano(tmp_path):
    return emulated_root("orin-nano-8gb", tmp_path / "nano")


def test_emulated_board_checks(nano, tmp_path):
    checks = by_name(run_checks(Platform(nano), DoctorOptions(emulated=True, bundle_dir=tmp_path, **FAST)))
    assert set(checks) == {"board", "l4t", "cuda", "tensorrt", "onnxruntime", "memory", "gpu memory", "storage read",
                           "storage 4k iops", "power mode", "jetson_clocks", "swap", "thermal", "cpu governor"}
    assert checks["board"].status == "pass" and "Orin Nano 8GB" in checks["board"].detail
    assert checks["l4t"].detail == "L4T 36.4.4, JetPack 6.2.1"
    assert checks["cuda"].status == "pass" and "12.6" in checks["cuda"].detail
    assert checks["memory"].status == "pass" and "7620 MiB" in checks["memory"].detail
    assert checks["swap"].status == "pass" and checks["cpu governor"].status == "pass"
    assert checks["thermal"].status == "pass" and "trip 99.0 C" in checks["thermal"].detail
    assert checks["power mode"].status == "warn" and "edge-sdk power set MAXN_SUPER" in checks["power mode"].fix
    for c in checks.values():
        assert c.status in ("pass", "warn", "fail") and (c.status == "pass" or c.fix)


def test_tensorrt_absent_is_a_warning_in_emulation_and_a_failure_on_a_device(nano, tmp_path):
    pytest.importorskip("onnxruntime")
    if "tensorrt" in sys.modules or __import__("importlib").util.find_spec("tensorrt"):
        pytest.skip("TensorRT is installed here")
    emu = by_name(run_checks(Platform(nano), DoctorOptions(emulated=True, storage=False)))
    dev = by_name(run_checks(Platform(nano), DoctorOptions(emulated=False, storage=False)))
    assert emu["tensorrt"].status == "warn" and dev["tensorrt"].status == "fail"
    assert "python3-libnvinfer" in dev["tensorrt"].fix


def test_memory_claimed_but_not_there(nano):
    meminfo = nano / "proc/meminfo"
    meminfo.write_text(re.sub(r"MemTotal:\s+\d+", "MemTotal: 3901440", meminfo.read_text()))
    checks = by_name(run_checks(Platform(nano), DoctorOptions(storage=False)))
    assert checks["memory"].status == "fail" and "claimed but not there" in checks["memory"].fix
    assert "3810 MiB" in checks["memory"].detail


def test_hot_board_disk_swap_and_powersave(nano):
    tj = next(z for z in (nano / "sys/class/thermal").iterdir() if (z / "type").read_text().strip() == "tj-thermal")
    (tj / "temp").write_text("93000\n")
    (nano / "proc/swaps").write_text("Filename Type Size Used Priority\n/swapfile file 4194300 0 -2\n")
    (nano / "sys/devices/system/cpu/cpufreq/policy0/scaling_governor").write_text("powersave\n")
    checks = by_name(run_checks(Platform(nano), DoctorOptions(storage=False)))
    assert checks["thermal"].status == "fail" and "headroom 6.0 C" in checks["thermal"].detail
    assert checks["swap"].status == "warn" and "zram" in checks["swap"].fix
    assert checks["cpu governor"].status == "warn" and "schedutil" in checks["cpu governor"].fix


def test_a_plain_directory_is_not_a_jetson(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 1000 kB\nMemFree: 500 kB\n")
    checks = by_name(run_checks(Platform(tmp_path), DoctorOptions(storage=False)))
    assert checks["board"].status == "fail" and "--emulate" in checks["board"].fix
    assert checks["l4t"].status == "fail" and checks["cuda"].status == "fail"
    assert checks["power mode"].status == "fail" and "not on PATH" in checks["power mode"].detail


def test_storage_probe_is_bounded_and_cleans_up(tmp_path):
    r = probe_storage(tmp_path, seconds=0.4, size_mb=8)
    assert r.seq_mbps > 0 and r.rand4k_iops > 0 and r.file_mb == 8
    assert r.direct or "O_DIRECT" in r.note  # the fallback says why
    assert list(tmp_path.iterdir()) == []


def test_doctor_cli_json(nano, tmp_path, capsys):
    rc = main(["doctor", "--root", str(nano), "--bundle-dir", str(tmp_path), "--storage-seconds", "0.3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["root"] == str(nano) and rc == (0 if out["ok"] else 1)
    assert {c["name"] for c in out["checks"]} >= {"board", "storage read", "thermal"}


def test_doctor_text_shows_fixes(nano, tmp_path, capsys):
    main(["doctor", "--root", str(nano), "--no-storage"])
    out = capsys.readouterr().out
    assert "PASS  board" in out and "WARN  power mode" in out and "fix: edge-sdk power set MAXN_SUPER" in out


def test_platform_modules_stay_light():
    mods = ["edge_sdk.runtime.platform", "edge_sdk.runtime.platform.power", "edge_sdk.runtime.platform.policies",
            "edge_sdk.runtime.platform.doctor", "edge_sdk.runtime.platform.simulation", "edge_sdk.runtime.platform.emulator",
            "edge_sdk.runtime.platform.fake_tools", "edge_sdk.cli.doctor", "edge_sdk.cli.power", "edge_sdk.cli.emulate"]
    code = f"import sys, {', '.join(mods)}; print(','.join(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_tensorrt_verdict_follows_the_root_not_the_flag(nano, tmp_path, capsys):
    """`doctor --root EMULATED_ROOT` with or without `--emulate` gives the same verdicts: the root says it is
    emulated. A tree that is not a Jetson does not need TensorRT either."""
    pytest.importorskip("onnxruntime")
    if __import__("importlib").util.find_spec("tensorrt"):
        pytest.skip("TensorRT is installed here")
    seen = []
    for flags in ([], ["--emulate", "orin-nano-8gb"]):
        code = main(["doctor", "--root", str(nano), "--no-storage", "--json", *flags])
        checks = {c["name"]: c["status"] for c in json.loads(capsys.readouterr().out)["checks"]}
        seen.append((code, checks))
    assert seen[0] == seen[1]
    assert seen[0][1]["tensorrt"] == "warn"
    assert Platform(nano).emulated and not Platform(tmp_path).emulated
    assert by_name(run_checks(Platform(tmp_path), DoctorOptions(storage=False)))["tensorrt"].status == "warn"
