"""`edge-sdk device update|status|rollback|boot-check` on a staged device (no daemon: --no-restart)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("cryptography")

from fleet_helpers import keypair, signed_bundle  # noqa: E402


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edge_sdk.cli.main", *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    t = tmp_path_factory.mktemp("fleet-cli")
    priv, pub = keypair(t / "keys")
    _, stranger_pub = keypair(t / "stranger")
    v1, v2 = signed_bundle(t / "v1", priv, "1"), signed_bundle(t / "v2", priv, "2")
    config = t / "edge-sdk.toml"
    config.write_text(f'bundle = "{t}/state/slots/current"\nbundle_key = "{pub}"\nemulate = "agx-orin-64gb"\n')
    return {"t": t, "config": config, "v1": v1, "v2": v2, "stranger_pub": stranger_pub}


def test_update_status_rollback(device):
    c = ["--config", device["config"], "--no-restart"]
    first = cli("device", "update", device["v1"], *c, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["slot"] == "a"
    second = cli("device", "update", device["v2"], *c)
    assert second.returncode == 0 and second.stdout.startswith("updated: slot b serves 2 ("), second.stdout
    st = json.loads(cli("device", "status", *c, "--json").stdout)
    assert st["active"] == "b" and st["slots"]["a"]["version"] == "1" and st["slots"]["b"]["verified"] == "ok"
    text = cli("device", "status", *c).stdout.splitlines()
    assert text[1].startswith("* b  2 ") and "health=good" in text[1]
    back = cli("device", "rollback", *c)
    assert back.returncode == 0 and "slot a serves 1" in back.stdout
    assert cli("device", "boot-check", *c).stdout.strip() == "no trial"


def test_untrusted_key_is_one_line(device):
    out = cli("device", "update", device["v2"], "--config", device["config"], "--no-restart", "--key", device["stranger_pub"])
    assert out.returncode == 4 and len(out.stderr.strip().splitlines()) == 1 and "signature does not match" in out.stderr


def test_config_not_on_a_slot_link_names_the_fix(tmp_path, device):
    config = tmp_path / "c.toml"
    config.write_text(f'bundle = "{device["v1"]}"\nbundle_key = "{device["t"]}/keys/signing.pub"\n')
    out = cli("device", "update", device["v2"], "--config", config)
    assert out.returncode == 2 and "slots/current" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_onfailure_gives_up_a_trial_and_health_skips_without_one(device, tmp_path):
    from edge_sdk.runtime.fleet.slots import SlotStore

    c = ["--config", device["config"], "--no-restart"]
    cli("device", "update", device["v1"], *c)
    assert cli("device", "health", *c, "--if-trial").returncode == 0  # no trial: nothing to check
    none = cli("device", "boot-check", *c, "--give-up")
    assert none.returncode == 1 and "nothing to give up" in none.stdout
    slots = SlotStore(device["t"] / "state" / "slots")
    other = "b" if slots.active() == "a" else "a"
    before = slots.active()
    cli("device", "update", device["v2"], *c)  # leaves `other` committed; put it on trial again by hand
    slots.switch(before)
    slots.begin_trial(other)
    slots.switch(other)
    out = cli("device", "boot-check", *c, "--give-up")
    assert out.returncode == 0 and f"slot {before} serves" in out.stdout and slots.active() == before
