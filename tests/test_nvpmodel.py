"""nvpmodel: the conf format, the captured CLI outputs, and the emulator's `nvpmodel` semantics."""

import hashlib
import subprocess

import pytest

from edge_sdk.boards import all_boards, get_board
from edge_sdk.errors import PlatformError, PowerModeError
from edge_sdk.runtime.platform import emulated_root
from edge_sdk.runtime.platform.nvpmodel_conf import parse_conf, render_conf
from edge_sdk.runtime.platform.power import parse_power_models, parse_query

CONF_SNIPPET = """
# comment
< PARAM TYPE=FILE NAME=CPU_ONLINE >
CORE_0 /sys/devices/system/cpu/cpu0/online
CORE_4 /sys/devices/system/cpu/cpu4/online
< PARAM TYPE=CLOCK NAME=GPU >
MAX_FREQ /sys/devices/platform/bus@0/17000000.gpu/devfreq/17000000.gpu/max_freq
< POWER_MODEL ID=1 NAME=MODE_15W >
CPU_ONLINE CORE_0 1
CPU_ONLINE CORE_4 0
TPC_POWER_GATING TPC_PG_MASK 248
CPU_A78_0 MAX_FREQ 1113600
GPU MAX_FREQ 408000000
EMC MAX_FREQ 2133000000
< POWER_MODEL ID=0 NAME=MAXN >
CPU_ONLINE CORE_0 1
CPU_ONLINE CORE_4 1
GPU MAX_FREQ -1
< PM_CONFIG DEFAULT=1 >
"""


def test_conf_syntax_parses():
    conf = parse_conf(CONF_SNIPPET)
    assert conf.default_id == 1
    assert conf.params["CPU_ONLINE"].type == "FILE" and conf.params["GPU"].type == "CLOCK"
    assert conf.params["CPU_ONLINE"].knobs["CORE_4"] == "/sys/devices/system/cpu/cpu4/online"
    m15 = conf.model("MODE_15W")
    assert (m15.id, m15.cores_online, m15.tpc_pg_mask) == (1, 1, 248)
    assert (m15.cap("CPU_A78_0"), m15.cap("GPU"), m15.cap("EMC")) == (1113600, 408000000, 2133000000)
    assert conf.model(0).cap("GPU") is None  # -1 = no cap
    with pytest.raises(PlatformError, match="valid modes: 1=MODE_15W, 0=MAXN"):
        conf.model(7)


@pytest.mark.parametrize("bad", ["", "< PARAM TYPE=FILE NAME=X >\nA /a\n", "< POWER_MODEL ID=0 NAME=M >\nonly two\n"])
def test_malformed_conf_is_an_error(bad):
    with pytest.raises(PlatformError):
        parse_conf(bad)


@pytest.mark.parametrize("board", all_boards(), ids=lambda b: b.name)
def test_rendered_conf_carries_the_board_modes(board):
    conf = parse_conf(render_conf(board))
    assert conf.default_id == board.default_mode.id
    for mode in board.power_modes:
        m = conf.model(mode.id)
        assert m.name == mode.name and m.cores_online == mode.cores_online and m.tpc_pg_mask == mode.tpc_pg_mask
        assert m.cap("CPU_A78_0") == (round(mode.cpu_max_mhz * 1000) if mode.cpu_max_mhz else None)
        assert m.cap("GPU") == (round(mode.gpu_max_mhz * 1e6) if mode.gpu_max_mhz else None)


def test_captured_query_outputs_parse():
    assert parse_query("NV Power Mode: MODE_30W\n2\n") == ("MODE_30W", 2)
    assert parse_query("NVPM WARN: fan mode is not set!\nNV Power Mode: MODE_30W\n2\n") == ("MODE_30W", 2)
    verbose = ("NVPM VERB: Config file: /etc/nvpmodel.conf\nNVPM VERB: parsing done for /etc/nvpmodel.conf\n"
               "NVPM VERB: Current mode: NV Power Mode: MAXN\nNV Power Mode: MAXN\n0\n")
    assert parse_query(verbose) == ("MAXN", 0)
    assert parse_power_models("NVPM VERB: POWER_MODEL: ID=2 NAME=MODE_30W\nNVPM VERB: POWER_MODEL: ID=0 NAME=MAXN\n") == [
        (2, "MODE_30W"), (0, "MAXN")]
    with pytest.raises(PowerModeError):
        parse_query("NVPM ERROR: failed\n")


@pytest.fixture
def agx(tmp_path):
    return emulated_root("agx-orin-64gb", tmp_path / "agx")


def nvpmodel(root, *args, input=""):
    return subprocess.run([str(root / "bin" / "nvpmodel"), *args], input=input, capture_output=True, text=True, timeout=60)


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted((root / "sys").rglob("*")) + [root / "var/lib/nvpmodel/status"]:
        if p.is_file() and not p.is_symlink():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_query_and_status_file(agx):
    assert (agx / "var/lib/nvpmodel/status").read_text().strip() == "pmode:0002"
    r = nvpmodel(agx, "-q")
    assert r.returncode == 0 and r.stdout == "NV Power Mode: MODE_30W\n2\n"
    r = nvpmodel(agx, "-q", "--verbose")
    assert r.stdout.startswith("NVPM VERB: Config file: /etc/nvpmodel.conf\n")
    assert parse_query(r.stdout) == ("MODE_30W", 2)


def test_print_verbose_lists_every_power_model(agx):
    r = nvpmodel(agx, "-p", "--verbose")
    assert parse_power_models(r.stdout) == [(0, "MAXN"), (1, "MODE_15W"), (2, "MODE_30W"), (3, "MODE_50W")]
    assert ("NVPM VERB: PARAM CPU_ONLINE: ARG CORE_4: PATH /sys/devices/system/cpu/cpu4/online: REAL_VAL: 1 CONF_VAL: 0"
            in r.stdout)


def test_declined_reboot_changes_nothing(agx):
    before = tree_digest(agx)
    r = nvpmodel(agx, "-m", "1", input="no\n")
    assert r.stdout.splitlines() == [
        "NVPM WARN: Reboot required for changing to this power mode: 1",
        "NVPM WARN: DO YOU WANT TO REBOOT NOW? enter YES/yes to confirm:",
        "NVPM ERROR: optMask is 1, no request for power mode"]
    assert r.returncode != 0
    assert tree_digest(agx) == before
    assert nvpmodel(agx, "-q").stdout == "NV Power Mode: MODE_30W\n2\n"


def test_accepted_reboot_to_mode_15w_takes_cores_offline_and_caps_clocks(agx):
    r = nvpmodel(agx, "-m", "1", input="YES\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (agx / "var/lib/nvpmodel/status").read_text().strip() == "pmode:0001"
    cpu = agx / "sys/devices/system/cpu"
    online = {i: (cpu / f"cpu{i}/online").read_text().strip() for i in range(1, 12)}
    assert online == {i: "1" if i < 4 else "0" for i in range(1, 12)}
    for policy in ("policy0", "policy4", "policy8"):
        assert (cpu / "cpufreq" / policy / "scaling_max_freq").read_text().strip() == "1113600"
    gpu = agx / "sys/devices/platform/bus@0/17000000.gpu"
    assert (gpu / "devfreq/17000000.gpu/max_freq").read_text().strip() == "408000000"
    assert (gpu / "tpc_pg_mask").read_text().strip() == "248"
    assert (agx / "sys/kernel/nvpmodel_clk_cap/emc").read_text().strip() == "2133000000"
    assert nvpmodel(agx, "-q").stdout == "NV Power Mode: MODE_15W\n1\n"


def test_switch_without_reboot_applies_at_once(tmp_path):
    nx = emulated_root("orin-nx-16gb", tmp_path / "nx")  # MODE_15W -> MODE_10W keeps 4 cores and the TPC mask
    r = nvpmodel(nx, "-m", "1")
    assert r.returncode == 0 and "Reboot" not in r.stdout
    pol = nx / "sys/devices/system/cpu/cpufreq/policy0"
    assert (pol / "scaling_max_freq").read_text().strip() == "1190400"
    assert int((pol / "scaling_cur_freq").read_text()) <= 1190400
    assert nvpmodel(nx, "-q").stdout == "NV Power Mode: MODE_10W\n1\n"


def test_invalid_mode_and_other_conf(agx, tmp_path):
    r = nvpmodel(agx, "-m", "9")
    assert r.returncode != 0 and "0, 1, 2, 3" in r.stderr
    other = agx / "etc/other.conf"
    other.write_text(CONF_SNIPPET.replace("MODE_15W", "LOW"))
    (agx / "var/lib/nvpmodel/status").write_text("pmode:0001\n")
    assert nvpmodel(agx, "-f", "/etc/other.conf", "-q").stdout == "NV Power Mode: LOW\n1\n"
    assert nvpmodel(agx, "-f", "/etc/missing.conf", "-q").returncode != 0


def test_conf_of_each_emulated_board_matches_profile(tmp_path):
    board = get_board("orin-nano-8gb")
    root = emulated_root(board.name, tmp_path / "nano")
    conf = parse_conf((root / "etc/nvpmodel.conf").read_text())
    assert [m.name for m in conf.models] == ["15W", "25W", "MAXN_SUPER", "7W"] and conf.default_id == 1
