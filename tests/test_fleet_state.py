"""The slot store's state.json, whatever a power cut or a hand edit left in it: read as a well-formed
state, and the boot counter, rollback and commit run on it without an exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.runtime.fleet.slots import SLOTS, STATE, SlotStore

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 5) | st.floats(allow_nan=False) | st.text(max_size=4),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=8)
ODD = st.sampled_from(["a", "b", "c", "", None, 1, True]) | st.lists(st.just("a"), max_size=2) | st.dictionaries(st.just("a"), st.just(1))
TRIAL = st.fixed_dictionaries({}, optional={"slot": ODD, "previous": ODD, "boots": st.integers(-3, 9) | st.booleans() | JSON,
                                            "started_at": JSON})
STATES = st.fixed_dictionaries({}, optional={"trial": TRIAL | JSON, "slots": st.dictionaries(st.sampled_from(["a", "b", "x"]), JSON, max_size=3) | JSON})
CONTENT = STATES.map(lambda s: json.dumps(s).encode()) | JSON.map(lambda s: json.dumps(s).encode()) | st.binary(max_size=64)


def _well_formed(state: dict) -> None:
    assert set(state) == {"trial", "slots"}
    trial = state["trial"]
    assert trial is None or (trial["slot"] in SLOTS and isinstance(trial["boots"], int))
    assert set(state["slots"]) <= set(SLOTS) and all(isinstance(v, dict) for v in state["slots"].values())


def _store(root: Path, content: bytes, active: str | None) -> SlotStore:
    store = SlotStore(root)
    store.ensure()
    for slot in SLOTS:
        (root / slot).mkdir()
    if active:
        store.switch(active)
    (root / STATE).write_bytes(content)
    return store


@settings(max_examples=300, deadline=None)
@given(content=CONTENT, active=st.sampled_from(["a", "b", None]), step=st.sampled_from(["boot_check", "roll_back", "commit"]))
def test_any_state_file_reads_well_formed_and_every_step_runs(content, active, step):
    with tempfile.TemporaryDirectory() as d:
        store = _store(Path(d), content, active)
        state = store.state()
        _well_formed(state)
        if step == "boot_check":
            assert isinstance(store.boot_check(), str)
        elif step == "roll_back":
            assert store.roll_back("test") in (*SLOTS, None)
        else:
            store.commit(store.inactive())
        _well_formed(store.state())
        assert store.active() in (*SLOTS, None)


@settings(max_examples=200, deadline=None)
@given(status=st.sampled_from([200, 500, 503]), health=JSON, reply=JSON | st.fixed_dictionaries(
    {}, optional={"choices": JSON, "usage": JSON | st.fixed_dictionaries({"completion_tokens": JSON}), "error": JSON}))
def test_any_daemon_answer_is_healthy_or_one_health_check_error(status, health, reply):
    """Whatever JSON the daemon answers /health and /v1/completions with: a result, or HealthCheckError."""
    from unittest import mock

    from edge_sdk.runtime.fleet import health as h

    check = h.HealthCheck("http://127.0.0.1:1", timeout_s=1.0, poll_s=0.0)
    clock = iter(range(100)).__next__  # a bounded wait: one /health request per tick
    with mock.patch.object(h, "_request", side_effect=lambda c, path, *a, **k: (status, health if path == "/health" else reply)):
        try:
            h.wait_healthy(check, clock=clock, sleep=lambda s: None)
            assert isinstance(h.generate(check), str)
        except h.HealthCheckError:
            pass
