"""Emulated roots: every board read back by the readers; the fake jetson_clocks and tegrastats."""

import json
import os
import subprocess
import sys
import time

import pytest

from edge_sdk.boards import board_names, get_board
from edge_sdk.cli.main import main
from edge_sdk.errors import PlatformError, UnknownBoardError
from edge_sdk.runtime.platform import Platform, PowerManager, emulated_root
from edge_sdk.runtime.platform.tegrastats import parse_line


@pytest.mark.parametrize("name", board_names())
def test_each_board_reads_back(tmp_path, name):
    board = get_board(name)
    p = Platform(emulated_root(name, tmp_path / name))
    info = p.board()
    assert info.profile == board and info.model == board.dt_model and info.compatible == list(board.dt_compatible)
    assert (info.l4t, info.jetpack) == ("36.4.4", "6.2.1")
    mem = p.meminfo()
    assert mem.total_kb // 1024 == board.mem_total_mb and mem.kb("SwapTotal") == mem.total_kb // 2
    assert mem.nvmap_used_kb > 0 and 0 < mem.allocatable_gpu_kb <= mem.total_kb
    s = p.snapshot()
    assert list(s.rails) == [label for labels in board.rails.values() for label in labels if label]
    for rail in s.rails.values():
        assert rail.mw == rail.mv * rail.ma // 1000 and rail.mw > 0
    assert board.power_w[0] * 100 < s.total_power_mw(p.total_rails()) < board.power_w[1] * 1000  # idle, in range
    mode = board.default_mode
    assert len(s.cpus) == board.cpu["cores"] and sum(c.online for c in s.cpus) == mode.cores_online
    assert all(c.mhz * 1000 <= (mode.cpu_max_mhz or board.cpu["max_mhz"]) * 1000 for c in s.cpus)
    assert s.gpu_mhz[0] <= (mode.gpu_max_mhz or board.gpu["max_mhz"])
    assert {"cpu", "tj", "soc0", "soc1", "soc2"} <= set(s.temps_mc) and s.temp_c("gpu") is None
    assert 20 < s.temp_c("tj") < 60 and p.trip_point_mc("tj") == 99000
    assert s.fan_pwm == 0 and s.fan_rpm == 0
    assert PowerManager(p).current().id == mode.id


def test_root_is_reused_and_guarded(tmp_path):
    root = emulated_root("orin-nano-8gb", tmp_path / "r")
    (root / "var/lib/nvpmodel/status").write_text("pmode:0003\n")
    assert emulated_root("orin-nano-8gb", root) == root
    assert (root / "var/lib/nvpmodel/status").read_text() == "pmode:0003\n"  # state kept
    with pytest.raises(PlatformError, match="already holds an emulated orin-nano-8gb"):
        emulated_root("agx-orin-64gb", root)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(PlatformError, match="not empty"):
        emulated_root("agx-orin-64gb", tmp_path / "busy")
    with pytest.raises(UnknownBoardError, match="agx-orin-64gb"):
        emulated_root("xavier", tmp_path / "x")


def test_default_location_is_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("EDGE_SDK_CACHE", raising=False)
    assert emulated_root("orin-nx-16gb") == tmp_path / "edge-sdk/emulated/orin-nx-16gb"
    assert Platform.from_options(emulate="orin-nx-16gb").root == tmp_path / "edge-sdk/emulated/orin-nx-16gb"


def test_emulate_cli(tmp_path, capsys):
    assert main(["emulate", "agx-orin-32gb", "--root", str(tmp_path / "e"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["root"] == str(tmp_path / "e") and (tmp_path / "e/bin/nvpmodel").exists()


def run_tool(root, tool, *args):
    return subprocess.run([str(root / "bin" / tool), *args], capture_output=True, text=True, timeout=60)


def test_jetson_clocks_pins_shows_stores_restores(tmp_path):
    root = emulated_root("agx-orin-64gb", tmp_path / "r")
    gpu = root / "sys/class/devfreq/17000000.gpu"
    pol = root / "sys/devices/system/cpu/cpufreq/policy0"
    assert run_tool(root, "jetson_clocks", "--store").returncode == 0
    assert (root / "root/l4t_dfs.conf").exists()
    assert run_tool(root, "jetson_clocks").returncode == 0
    assert (gpu / "min_freq").read_text() == (gpu / "max_freq").read_text() == "612000000\n"
    assert (pol / "scaling_min_freq").read_text() == (pol / "scaling_max_freq").read_text() == "1728000\n"
    show = run_tool(root, "jetson_clocks", "--show").stdout.splitlines()
    assert show[0] == "SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit"
    assert show[1] == "Online CPUs: 0,1,2,3,4,5,6,7"
    assert "cpu8: Online=0" in show[10] and "GPU MinFreq=612000000 MaxFreq=612000000 CurrentFreq=612000000" in show
    assert show[-1] == "NV Power Mode: MODE_30W"
    assert run_tool(root, "jetson_clocks", "--restore").returncode == 0
    assert (gpu / "min_freq").read_text() == "306000000\n" and (pol / "scaling_min_freq").read_text() == "729600\n"
    assert run_tool(root, "jetson_clocks", "--restore", "/nope.conf").returncode != 0


def test_tegrastats_interval_and_logfile(tmp_path):
    root = emulated_root("orin-nx-16gb", tmp_path / "r")
    log = tmp_path / "t.log"
    proc = subprocess.Popen([str(root / "bin/tegrastats"), "--interval", "100", "--logfile", str(log)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
            time.sleep(0.1)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    lines = log.read_text().splitlines()
    assert len(lines) >= 3
    s = parse_line(lines[-1])
    assert list(s.rails) == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"] and s.ram_total_mb == 15368
    assert [c.online for c in s.cpus] == [True] * 4 + [False] * 4  # MODE_15W: 4 cores
    assert run_tool(root, "tegrastats", "--interval", "0").returncode != 0


def test_concurrent_creation_gives_one_whole_root(tmp_path):
    code = ("import sys; from edge_sdk.runtime.platform import emulated_root, Platform; "
            "r = emulated_root('agx-orin-32gb', sys.argv[1]); print(Platform(r).board().name)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "shared")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o.strip() for o, _e in outs] == ["agx-orin-32gb"] * 3, [e for _o, e in outs]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # no staging directories left behind


def test_two_roots_in_one_process_keep_their_own_state(tmp_path):
    a = Platform(emulated_root("agx-orin-64gb", tmp_path / "a"))
    b = Platform(emulated_root("agx-orin-64gb", tmp_path / "b"))
    pa, pb = PowerManager(a), PowerManager(b)
    before = {f: (b.root / f).read_bytes() for f in ("var/lib/nvpmodel/status", "sys/kernel/nvpmodel_clk_cap/emc")}
    pa.set("MODE_15W", allow_reboot=True)
    assert run_tool(a.root, "jetson_clocks").returncode == 0
    assert pa.current().name == "MODE_15W" and pb.current().name == "MODE_30W"
    assert {f: (b.root / f).read_bytes() for f in before} == before
    gpu = "sys/class/devfreq/17000000.gpu"
    assert (a.root / gpu / "min_freq").read_text() == (a.root / gpu / "max_freq").read_text()
    assert (b.root / gpu / "min_freq").read_text() != (b.root / gpu / "max_freq").read_text()


def test_the_default_board_follows_the_cache_setting(tmp_path, monkeypatch):
    """Two jobs with their own EDGE_SDK_CACHE get their own default board, and so their own power mode."""
    roots = []
    for job in ("job1", "job2"):
        monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path / job))
        roots.append(Platform.from_options(emulate="orin-nx-16gb").root)
    assert roots == [tmp_path / "job1/emulated/orin-nx-16gb", tmp_path / "job2/emulated/orin-nx-16gb"]
    PowerManager(Platform(roots[0])).set("MODE_10W")
    assert PowerManager(Platform(roots[1])).current().name != "MODE_10W"


def _has_open(pid: int, path: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # no /proc here: the fixed wait below is all there is
        return True
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                return True
        except OSError:
            pass
    return False


def test_mode_changes_on_one_root_wait_for_each_other(tmp_path):
    """While one nvpmodel holds the board's lock, another's switch waits; it lands whole once let go."""
    import fcntl

    root = emulated_root("orin-nx-16gb", tmp_path / "r")  # MODE_15W -> MODE_10W: no reboot
    status = root / "var/lib/nvpmodel/status"
    with open(root / ".edge-sdk-emulated.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([str(root / "bin/nvpmodel"), "-m", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lock = os.path.realpath(root / ".edge-sdk-emulated.lock")
        deadline = time.monotonic() + 60  # until it holds the lock file open: it is at the lock, however slow it started
        while not _has_open(proc.pid, lock) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # blocked on the lock (a free run ends well within this)
        assert status.read_text().strip() == "pmode:0002"
    assert proc.wait(timeout=60) == 0
    assert status.read_text().strip() == "pmode:0001"
