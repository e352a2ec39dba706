"""Power: modes, switching and its log, the simulation's physics, policies, energy per token."""

import math
import subprocess
import sys
import time

import pytest

from edge_sdk.boards import get_board
from edge_sdk.cli.main import main
from edge_sdk.errors import ConfigError, PowerModeError
from edge_sdk.runtime.platform import Platform, PowerManager, Simulation, emulated_root
from edge_sdk.runtime.platform.policies import Efficiency, PowerCap, ThermalGuard, make_policy
from edge_sdk.runtime.platform.power import EnergyMeter, integrate_energy
from edge_sdk.runtime.platform.root import SysRoot
from edge_sdk.runtime.platform.simulation import BoardModel, SimState, read_caps, read_state, step, write_state


@pytest.fixture
def agx(tmp_path):
    return Platform(emulated_root("agx-orin-64gb", tmp_path / "agx"))


def test_modes_come_from_the_conf(agx):
    pm = PowerManager(agx)
    modes = pm.modes()
    assert [(m.id, m.name, m.cores_online, m.budget_w) for m in modes] == [
        (0, "MAXN", 12, 60), (1, "MODE_15W", 4, 15), (2, "MODE_30W", 8, 30), (3, "MODE_50W", 12, 50)]
    assert modes[1].cpu_max_mhz == 1113.6 and modes[1].gpu_max_mhz == 408 and modes[1].emc_max_mhz == 2133
    assert [m.default for m in modes] == [False, False, True, False]
    with pytest.raises(PowerModeError, match="valid modes: 0=MAXN, 1=MODE_15W, 2=MODE_30W, 3=MODE_50W"):
        pm.mode("MODE_99W")


def test_reboot_switch_is_refused_unless_allowed(agx):
    pm = PowerManager(agx)
    seen = []
    pm.subscribe(seen.append)
    with pytest.raises(PowerModeError, match="needs a reboot") as exc:
        pm.set("MODE_15W")
    assert "allow_reboot=True" in str(exc.value) and "--allow-reboot" not in str(exc.value)  # the API speaks Python
    assert pm.current().name == "MODE_30W" and pm.events == []
    change = pm.set("MODE_15W", allow_reboot=True, reason="test")
    assert (change.old, change.new, change.reboot, change.reason) == ("MODE_30W", "MODE_15W", True, "test")
    assert pm.current().name == "MODE_15W" and seen == [change] and pm.events == [change]
    assert pm.set("MODE_15W") is None  # already there


def test_switch_without_reboot_and_reachable_modes(agx):
    pm = PowerManager(agx)
    pm.set("MAXN", allow_reboot=True)
    assert [m.name for m in pm.reachable()] == ["MODE_50W", "MAXN"]  # same cores and TPC mask
    change = pm.set(3)
    assert change.new == "MODE_50W" and not change.reboot
    pol = agx.root / "sys/devices/system/cpu/cpufreq/policy8/scaling_max_freq"
    assert pol.read_text().strip() == "1497600"


def test_power_cli(agx, capsys):
    root = str(agx.root)
    assert main(["power", "status", "--root", root, "--json"]) == 0
    import json

    st = json.loads(capsys.readouterr().out)
    assert st["current"]["name"] == "MODE_30W" and st["tj_c"] > 20
    assert [m["needs_reboot"] for m in st["modes"]] == [True, True, False, True]
    assert main(["power", "set", "MODE_15W", "--root", root]) == 8
    err = capsys.readouterr().err
    assert "--allow-reboot" in err and "allow_reboot" not in err  # the CLI speaks flags
    assert main(["power", "set", "MODE_15W", "--root", root, "--allow-reboot"]) == 0
    assert "MODE_30W -> MODE_15W" in capsys.readouterr().out
    assert main(["power", "policy", "performance", "--root", root, "--seconds", "0", "--allow-reboot"]) == 0
    assert "MODE_15W -> MAXN: performance" in capsys.readouterr().out
    assert main(["power", "policy", "power-cap", "--root", root]) == 2


# -- simulation physics -------------------------------------------------------------------------------

MODEL = BoardModel.of(get_board("agx-orin-64gb"))


def caps(cores=12, cpu=2201600, gpu=1300500000, emc=3199000000):
    from edge_sdk.runtime.platform.simulation import Caps

    return Caps(cores_online=cores, cpu_min_khz=729600, cpu_max_khz=cpu, gpu_min_hz=306000000, gpu_max_hz=gpu, emc_max_hz=emc)


def test_power_rises_with_load_and_clocks():
    idle = step(SimState(tj_mc=40000), 1.0, 0.0, caps(), MODEL)
    half = step(SimState(tj_mc=40000), 1.0, 0.5, caps(), MODEL)
    full = step(SimState(tj_mc=40000), 1.0, 1.0, caps(), MODEL)
    capped = step(SimState(tj_mc=40000), 1.0, 1.0, caps(cores=4, cpu=1113600, gpu=408000000, emc=2133000000), MODEL)
    assert idle.total_mw < half.total_mw < full.total_mw
    assert capped.total_mw < full.total_mw
    assert (capped.cpu_khz, capped.gpu_hz) == (1113600, 408000000) and (idle.cpu_khz, idle.gpu_hz) == (729600, 306000000)
    total_w = sum(mw for n, mw in full.rails_mw if n in MODEL.total_rails) / 1000
    assert 15 <= sum(m["idle"] for n, m in MODEL.rails_mw.items() if n in MODEL.total_rails) / 1000 + 8 <= 60
    assert 40 <= total_w <= 60  # full load at MAXN stays inside the module's 60 W


def test_temperature_follows_power_with_the_time_constant():
    full_w = sum(mw for n, mw in step(SimState(tj_mc=35000), 1, 1.0, caps(), MODEL).rails_mw if n in MODEL.total_rails) / 1000
    tj_ss = MODEL.ambient_mc + MODEL.c_per_w * full_w * 1000
    s = step(SimState(tj_mc=40000), MODEL.tau_s, 1.0, caps(), MODEL)
    assert s.tj_mc == pytest.approx(tj_ss + (40000 - tj_ss) * math.exp(-1), rel=1e-9)  # 63 % of the way in one tau
    for _ in range(100):
        s = step(s, 10.0, 1.0, caps(), MODEL)
    assert s.tj_mc == pytest.approx(min(tj_ss, 105000), rel=1e-3) and s.tj_mc <= 105000
    for _ in range(100):
        s = step(s, 10.0, 0.0, caps(), MODEL)
    assert s.tj_mc < 45000  # cools back towards ambient when idle


def test_caps_follow_the_mode_in_the_tree(agx):
    r = SysRoot(agx.root)
    before = read_caps(r, MODEL)
    assert (before.cores_online, before.cpu_max_khz, before.gpu_max_hz) == (8, 1728000, 612000000)
    PowerManager(agx).set("MODE_15W", allow_reboot=True)
    after = read_caps(r, MODEL)
    assert (after.cores_online, after.cpu_max_khz, after.gpu_max_hz, after.emc_max_hz) == (4, 1113600, 408000000, 2133000000)


def test_simulation_process_follows_a_real_workload(agx):
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # busy until killed
    try:
        rail = agx.snapshot().rails["VDD_CPU_CV"].mw
        with Simulation(agx.root, watch_pid=burner.pid, interval_s=0.2) as sim:
            deadline = time.monotonic() + 60  # the simulation process starting on a loaded machine
            while time.monotonic() < deadline:
                time.sleep(0.3)
                s = agx.snapshot()
                if s.gpu_load_pct and s.rails["VDD_CPU_CV"].mw > rail and s.gpu_mhz[0] > 306:
                    break
            assert sim.running
        assert not sim.running
        assert s.gpu_load_pct > 0 and s.rails["VDD_CPU_CV"].mw > rail and s.gpu_mhz[0] > 306
        assert s.gpu_mhz[0] <= 612 and max(c.mhz for c in s.cpus) <= 1728  # MODE_30W caps
        frozen = (agx.root / "sys/devices/platform/bus@0/17000000.gpu/load").read_text()
        time.sleep(0.5)
        assert (agx.root / "sys/devices/platform/bus@0/17000000.gpu/load").read_text() == frozen  # stopped cleanly
    finally:
        burner.kill()
        burner.wait()


# -- policies -----------------------------------------------------------------------------------------

def test_thermal_guard_steps_down_and_back_up_with_hysteresis(agx):
    pm = PowerManager(agx)
    pm.set("MAXN", allow_reboot=True)
    r = SysRoot(agx.root)
    guard = ThermalGuard(margin_c=10, hysteresis_c=8, hold_s=20)
    down_at, up_at = guard.thresholds_mc(agx)
    assert (down_at, up_at) == (89000, 81000)
    state, t, trace = read_state(r), 0.0, []
    for _ in range(60):  # up to 5 simulated minutes at full load, 5 s ticks
        c = read_caps(r, MODEL)
        state = step(state, 5.0, 1.0, c, MODEL)
        write_state(r, state, c, MODEL, 5.0)
        t += 5.0
        snap = agx.snapshot()
        snap.time_s = t
        change = pm.run_policy(guard, snap)
        if change:
            trace.append((t, snap.temps_mc["tj"], change.old, change.new))
        if len(trace) == 3:
            break
    assert [(old, new) for _t, _tj, old, new in trace] == [("MAXN", "MODE_50W"), ("MODE_50W", "MAXN"), ("MAXN", "MODE_50W")]
    for _t, tj, old, new in trace:
        assert tj >= down_at if new == "MODE_50W" else tj <= up_at
    assert all(b[0] - a[0] >= 20 for a, b in zip(trace, trace[1:]))  # hold time between changes
    assert all("thermal-guard: tj" in e.reason for e in pm.events[1:])


def test_power_cap_steps_down_when_measured_over_and_back(agx):
    pm = PowerManager(agx)
    pm.set("MODE_50W", allow_reboot=True)
    snap = agx.snapshot()
    cap = PowerCap(watts=55)
    assert pm.run_policy(cap, snap, allow_reboot=True) is None  # 50 W budget fits, MAXN's 60 W does not
    for rail in snap.rails.values():
        rail.mw = 20000
    change = pm.run_policy(cap, snap, allow_reboot=True)
    assert change.new == "MODE_30W" and "measured 60.0 W over the 55 W cap" in change.reason
    for rail in snap.rails.values():
        rail.mw = 5000
    assert pm.run_policy(cap, snap, allow_reboot=True).new == "MODE_50W"
    with pytest.raises(ConfigError):
        PowerCap(watts=0)


def test_power_cap_follows_budget(agx):
    pm = PowerManager(agx)
    pm.set("MAXN", allow_reboot=True)
    snap = agx.snapshot()
    change = pm.run_policy(PowerCap(watts=50), snap)
    assert change.new == "MODE_50W" and "exceeds the 50 W cap" in change.reason


def test_efficiency_measures_then_settles(agx):
    pm = PowerManager(agx)
    pm.set("MAXN", allow_reboot=True)
    eff = make_policy("efficiency")
    snap = agx.snapshot()
    eff.record("MAXN", 0.9)
    change = pm.run_policy(eff, snap)
    assert change.new == "MODE_50W" and "measuring" in change.reason
    eff.record("MODE_50W", 0.6)
    assert pm.run_policy(eff, snap) is None
    eff.record("MAXN", 0.5)
    assert pm.run_policy(eff, snap).new == "MAXN"


def test_unknown_policy():
    with pytest.raises(ConfigError, match="performance, efficiency, power-cap, thermal-guard"):
        make_policy("turbo")
    assert isinstance(make_policy("efficiency"), Efficiency)


# -- energy -------------------------------------------------------------------------------------------

def test_integrate_energy_by_hand():
    assert integrate_energy([(0.0, 1000.0), (1.0, 1000.0), (3.0, 3000.0)]) == pytest.approx(1.0 + 4.0)
    assert integrate_energy([(0.0, 5000.0)]) == 0


def test_energy_meter_on_constant_rails(agx):
    snap = agx.snapshot()
    watts = snap.total_power_mw(agx.total_rails()) / 1000
    with EnergyMeter(agx, interval_s=0.05) as meter:
        deadline = time.monotonic() + 30  # the sampling thread may be starved on a loaded machine
        while len(meter.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    elapsed = meter.samples[-1][0] - meter.samples[0][0]
    assert len(meter.samples) >= 3
    assert meter.joules == pytest.approx(watts * elapsed, rel=1e-9)
    assert meter.mean_w == pytest.approx(watts) and meter.per_token(10) == pytest.approx(meter.joules / 10)
    assert meter.per_token(0) is None


@pytest.mark.parametrize("make", [lambda p: EnergyMeter(p, interval_s=0), lambda p: Simulation(p.root, interval_s=-1),
                                  lambda p: ThermalGuard(hysteresis_c=0)])
def test_bad_settings_name_the_range(agx, make):
    with pytest.raises(ConfigError):
        make(agx)


def test_thermal_guard_never_climbs_above_the_starting_mode(agx):
    pm = PowerManager(agx)
    pm.set("MODE_50W", allow_reboot=True)
    guard = ThermalGuard(hold_s=0)
    cool = agx.snapshot()
    assert cool.temp_c("tj") < 50
    assert pm.run_policy(guard, cool) is None  # MAXN is reachable but above the chosen mode
    hot = agx.snapshot()
    hot.temps_mc["tj"] = 95000
    assert pm.run_policy(guard, hot) is None  # nothing reachable below MODE_50W without a reboot
    assert pm.run_policy(guard, hot, allow_reboot=True).new == "MODE_30W"
    assert pm.run_policy(guard, agx.snapshot(), allow_reboot=True).new == "MODE_50W"
    assert pm.run_policy(guard, agx.snapshot(), allow_reboot=True) is None


def test_simulated_proc_stat_drives_cpu_load(agx):
    r = SysRoot(agx.root)
    agx.snapshot()
    c = read_caps(r, MODEL)
    write_state(r, step(read_state(r), 2.0, 0.25, c, MODEL), c, MODEL, 2.0)
    s = agx.snapshot()
    assert [x.load_pct for x in s.cpus if x.online] == [25] * 8
    stat = (agx.root / "proc/stat").read_text().splitlines()
    assert stat[0].split()[1] == str(50 * 8)  # aggregate line sums the cores (USER_HZ 100)
