"""Platform readers on hand-built roots: units, NVIDIA's memory formula, board detection, degradation."""

import logging
import os
from pathlib import Path

import pytest

from edge_sdk.errors import PlatformError
from edge_sdk.runtime.platform import Platform
from edge_sdk.runtime.platform.board import jetpack_of, parse_tegra_release
from edge_sdk.runtime.platform.meminfo import MemInfo, parse_meminfo

MEMINFO = """MemTotal:       64349820 kB
MemFree:        40000000 kB
MemAvailable:   50000000 kB
Buffers:          100000 kB
Cached:          9000000 kB
SwapCached:            0 kB
SwapTotal:      32174908 kB
SwapFree:       32000000 kB
NvMapMemFree:      10000 kB
NvMapMemUsed:    2000000 kB
"""


def put(root, rel, text):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.fixture
def partial(tmp_path):
    """An AGX Orin image with one hwmon's rails missing, an offline sensor and an unreadable cv zone."""
    r = tmp_path
    put(r, "proc/device-tree/model", b"NVIDIA Jetson AGX Orin Developer Kit\0")
    put(r, "proc/device-tree/compatible", b"nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0")
    put(r, "etc/nv_tegra_release", "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x\n")
    put(r, "proc/meminfo", MEMINFO)
    hw = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"  # N is not always 1: found by glob
    put(r, f"{hw}/in1_label", "VDD_GPU_SOC\n")
    put(r, f"{hw}/in1_input", "4992\n")
    put(r, f"{hw}/curr1_input", "483\n")
    put(r, f"{hw}/in2_label", "VDD_CPU_CV\n")
    put(r, f"{hw}/in2_input", "5000\n")
    put(r, f"{hw}/curr2_input", "321\n")
    put(r, f"{hw}/in3_label", "VIN_SYS_5V0\n")  # no curr3_input: not a rail
    zones = [("cpu-thermal", "52562"), ("gpu-thermal", "-256000"), ("cv0-thermal", ""), ("tj-thermal", "52562")]
    for n, (ztype, temp) in enumerate(zones):
        put(r, f"sys/class/thermal/thermal_zone{n}/type", ztype + "\n")
        put(r, f"sys/class/thermal/thermal_zone{n}/temp", temp)
    put(r, "sys/class/thermal/thermal_zone3/trip_point_0_temp", "99000\n")
    put(r, "sys/class/thermal/thermal_zone3/trip_point_1_temp", "104500\n")
    for i, online in enumerate("1110"):
        if i:
            put(r, f"sys/devices/system/cpu/cpu{i}/online", online)
        put(r, f"sys/devices/system/cpu/cpu{i}/cpufreq/scaling_cur_freq", "1728000")
    put(r, "proc/stat", "cpu  0 0 0 0\ncpu0 100 0 0 900 0 0 0\ncpu1 50 0 0 950\ncpu2 0 0 0 1000\ncpu3 0 0 0 0\n")
    return r


def test_partial_root_degrades_with_one_warning(partial, caplog):
    p = Platform(partial)
    with caplog.at_level(logging.WARNING, logger="edge_sdk.platform"):
        s1 = p.snapshot()
        s2 = p.snapshot()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cv0-thermal unreadable" in warnings[0].getMessage() and "GPU" in warnings[0].getMessage()
    assert {k: r.mw for k, r in s1.rails.items()} == {"VDD_GPU_SOC": 4992 * 483 // 1000, "VDD_CPU_CV": 5000 * 321 // 1000}
    assert s1.temps_mc == {"cpu": 52562, "gpu": -256000, "tj": 52562}
    assert s1.temp_c("gpu") is None and s1.temp_c("tj") == pytest.approx(52.562)
    assert s1.gpu_load_pct is None and s1.fan_pwm is None
    assert [c.online for c in s1.cpus] == [True, True, True, False]
    assert [c.load_pct for c in s1.cpus] == [10, 5, 0, 0]  # since boot on the first read
    assert s2.rails["VDD_GPU_SOC"].avg_mw == s1.rails["VDD_GPU_SOC"].mw
    assert p.trip_point_mc("tj") == 99000


def test_cpu_load_is_the_delta_between_ticks(partial):
    p = Platform(partial)
    p.snapshot()
    put(partial, "proc/stat", "cpu  0 0 0 0\ncpu0 175 0 0 925 0 0 0\ncpu1 50 0 0 1050\ncpu2 0 0 0 1000\ncpu3 0 0 0 0\n")
    s = p.snapshot()
    assert [c.load_pct for c in s.cpus[:3]] == [75, 0, 0]
    assert [c.mhz for c in s.cpus] == [1728, 1728, 1728, 0]


def test_rails_reread_each_tick_but_discovered_once(partial):
    p = Platform(partial)
    assert p.snapshot().rails["VDD_CPU_CV"].mw == 1605
    put(partial, "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3/curr2_input", "1000")
    put(partial, "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3/curr3_input", "1000")  # appears later: not rediscovered
    s = p.snapshot()
    assert s.rails["VDD_CPU_CV"].mw == 5000 and s.rails["VDD_CPU_CV"].avg_mw == (1605 + 5000) // 2
    assert "VIN_SYS_5V0" not in s.rails


def test_board_detection(partial):
    b = Platform(partial).board()
    assert (b.name, b.module, b.l4t, b.jetpack, b.is_jetson) == ("agx-orin-64gb", "p3701-0005", "36.4.3", "6.2", True)
    assert b.model == "NVIDIA Jetson AGX Orin Developer Kit"


def test_unknown_root_is_not_a_jetson(tmp_path):
    b = Platform(tmp_path).board()
    assert b.profile is None and not b.is_jetson and b.l4t is None
    with pytest.raises(PlatformError, match="meminfo"):
        Platform(tmp_path).meminfo()


@pytest.mark.parametrize("text, l4t, jp", [
    ("# R36 (release), REVISION: 4.4, GCID: 41062509, BOARD: generic", "36.4.4", "6.2.1"),
    ("# R36 (release), REVISION: 3.0, GCID: 1", "36.3.0", "6.0"),
    ("# R36 (release), REVISION: 4.7, GCID: 1", "36.4.7", "6.2.1"),
    ("# R35 (release), REVISION: 5.0", "35.5.0", None),
    ("garbage", None, None),
])
def test_l4t_and_jetpack(text, l4t, jp):
    assert parse_tegra_release(text) == l4t and jetpack_of(l4t) == jp


def test_allocatable_gpu_memory_formula():
    m = MemInfo(parse_meminfo(MEMINFO))
    # host_used = (64349820 - 40000000) - 2000000 = 22_349_820 kB < SwapFree 32_000_000
    assert m.allocatable_gpu_kb == 64349820 - 2000000 == 62349820  # MemTotal - NvMapMemUsed
    tight = dict(m.fields, MemFree=1_000_000, SwapFree=10_000_000)
    used = (64349820 - 1_000_000) - 2000000
    assert MemInfo(tight).allocatable_gpu_kb == 64349820 - (used - 10_000_000) == 13_000_000
    assert m.ram_used_mb == (64349820 - 40000000 - 100000 - 9000000) // 1024


def test_memory_readings(partial):
    p = Platform(partial)
    assert p.allocatable_gpu_bytes() == 62349820 * 1024
    s = p.snapshot()
    assert (s.ram_total_mb, s.swap_total_mb, s.swap_used_mb) == (64349820 // 1024, 32174908 // 1024, 174908 // 1024)


def test_lfb_from_buddyinfo(partial):
    put(partial, "proc/buddyinfo", "Node 0, zone      DMA      1 1 1 1 1 1 1 1 1 1 3\n"
                                   "Node 0, zone   Normal    9 9 9 9 9 9 9 9 9 9 463\n")
    s = Platform(partial).snapshot()
    assert (s.lfb_blocks, s.lfb_block_mb) == (466, 4)


def test_commands_come_from_root_bin_with_a_timeout(tmp_path):
    (tmp_path / "bin").mkdir()
    tool = tmp_path / "bin" / "nvpmodel"
    tool.write_text("#!/bin/sh\necho from-root \"$@\"\n")
    tool.chmod(0o755)
    slow = tmp_path / "bin" / "tegrastats"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    p = Platform(tmp_path)
    assert p.run(["nvpmodel", "-q"]).stdout == "from-root -q\n"
    with pytest.raises(PlatformError, match="did not finish within 0.3 s"):
        p.run(["tegrastats"], timeout=0.3)
    with pytest.raises(PlatformError, match="not on PATH"):
        p.run(["jetson_clocks_missing"])
    failing = tmp_path / "bin" / "jetson_clocks"
    failing.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(PlatformError, match="exit code 3: boom"):
        p.run(["jetson_clocks"])


def test_only_the_cli_reads_the_environment(tmp_path, monkeypatch):
    from edge_sdk.cli.main import build_parser

    monkeypatch.setenv("EDGE_SDK_ROOT", str(tmp_path))
    monkeypatch.delenv("EDGE_SDK_EMULATE", raising=False)
    assert Platform.from_options().root == Path("/")
    assert Platform.from_options(root=os.fspath(tmp_path / "x")).root == tmp_path / "x"
    args = build_parser().parse_args(["doctor"])
    assert Platform.from_options(emulate=args.emulate, root=args.root).root == tmp_path


def test_r35_gpu_paths_are_found(partial):
    put(partial, "sys/devices/gpu.0/load", "437\n")
    put(partial, "sys/devices/17000000.ga10b/devfreq/17000000.ga10b/cur_freq", "918000000\n")
    s = Platform(partial).snapshot()
    assert (s.gpu_load_pct, s.gpu_mhz) == (44, [918])


def test_missing_meminfo_degrades_in_snapshots(partial, caplog):
    (partial / "proc/meminfo").unlink()
    p = Platform(partial)
    with caplog.at_level(logging.WARNING, logger="edge_sdk.platform"):
        s = p.snapshot()
        p.snapshot()
    assert s.ram_total_mb == 0 and s.rails
    assert sum("no readable /proc/meminfo" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(PlatformError):
        p.allocatable_gpu_bytes()
