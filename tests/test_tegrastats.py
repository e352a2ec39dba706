"""tegrastats lines: the captured r36 line parses exactly and round-trips; snapshots render and re-parse."""

import pytest

from edge_sdk.errors import PlatformError
from edge_sdk.runtime.platform import Platform, emulated_root
from edge_sdk.runtime.platform.tegrastats import parse_line, render_line

# r36.4.4, AGX Orin 64GB, captured on a device
R36_LINE = (
    "05-09-2026 18:42:06 RAM 18207/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) "
    "CPU [14%@2188,5%@2112,8%@2035,14%@2201,46%@1267,47%@1267,2%@1267,10%@1267,4%@1036,5%@1036,6%@1036,10%@1036] "
    "EMC_FREQ 3%@2133 GR3D_FREQ 0%@[0,0] NVENC 79%@166 NVDEC off NVJPG off NVJPG1 off VIC 36%@115 OFA off "
    "NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 cpu@52.562C soc2@48.437C soc0@49.093C tj@52.562C soc1@49.656C "
    "VDD_GPU_SOC 2412mW/2412mW VDD_CPU_CV 1607mW/1607mW VIN_SYS_5V0 4707mW/4707mW"
)


def test_real_r36_line_parses_exactly():
    s = parse_line(R36_LINE)
    assert s.stamp == "05-09-2026 18:42:06"
    assert (s.ram_used_mb, s.ram_total_mb, s.lfb_blocks, s.lfb_block_mb) == (18207, 62841, 466, 4)
    assert (s.swap_used_mb, s.swap_total_mb, s.swap_cached_mb) == (86, 31420, 0)
    assert [c.load_pct for c in s.cpus] == [14, 5, 8, 14, 46, 47, 2, 10, 4, 5, 6, 10]
    assert [c.mhz for c in s.cpus] == [2188, 2112, 2035, 2201] + [1267] * 4 + [1036] * 4
    assert all(c.online for c in s.cpus)
    assert (s.emc_load_pct, s.emc_mhz) == (3, 2133)
    assert (s.gpu_load_pct, s.gpu_mhz, s.gpu_mhz_bracketed) == (0, [0, 0], True)
    assert s.engines == {"NVENC": "79%@166", "NVDEC": "off", "NVJPG": "off", "NVJPG1": "off", "VIC": "36%@115",
                         "OFA": "off", "NVDLA0": "off", "NVDLA1": "off", "PVA0_FREQ": "off", "APE": "174"}
    assert s.temps_mc == {"cpu": 52562, "soc2": 48437, "soc0": 49093, "tj": 52562, "soc1": 49656}
    assert s.temp_c("tj") == pytest.approx(52.562)
    assert {k: (r.mw, r.avg_mw) for k, r in s.rails.items()} == {
        "VDD_GPU_SOC": (2412, 2412), "VDD_CPU_CV": (1607, 1607), "VIN_SYS_5V0": (4707, 4707)}
    assert s.total_power_mw() == 2412 + 1607 + 4707


def test_real_r36_line_round_trips():
    assert render_line(parse_line(R36_LINE)) == R36_LINE


def test_offline_core_and_single_gpu_clock():
    line = ("01-02-2026 03:04:05 RAM 900/7620MB (lfb 12x4MB) SWAP 0/3810MB (cached 0MB) CPU [3%@729,off,off,1%@729] "
            "EMC_FREQ 0%@2133 GR3D_FREQ 12%@612 tj@41.250C VDD_IN 4200mW/4100mW")
    s = parse_line(line)
    assert [c.online for c in s.cpus] == [True, False, False, True]
    assert (s.gpu_load_pct, s.gpu_mhz, s.gpu_mhz_bracketed) == (12, [612], False)
    assert s.total_power_mw() == 4200  # VDD_IN is the board input
    assert render_line(s) == line


@pytest.mark.parametrize("bad", ["", "hello", "05-09-2026 18:42:06 RAM 1/2MB SWAP 0/0MB (cached 0MB) CPU [x@1]",
                                 R36_LINE.replace("APE 174", "APE ???")])
def test_bad_lines_name_the_problem(bad):
    with pytest.raises(PlatformError):
        parse_line(bad)


@pytest.mark.parametrize("board", ["agx-orin-64gb", "orin-nano-8gb"])
def test_snapshot_of_an_emulated_board_renders_and_reparses(tmp_path, board):
    snap = Platform(emulated_root(board, tmp_path / "root")).snapshot()
    again = parse_line(render_line(snap))
    assert render_line(again) == render_line(snap)
    assert again.ram_total_mb == snap.ram_total_mb and list(again.rails) == list(snap.rails)
    assert "gpu" not in again.temps_mc  # offline sensors are left out, as on the captured line
    assert again.temps_mc == {k: v for k, v in snap.temps_mc.items() if v > -256000}
