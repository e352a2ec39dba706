"""Stop strings over streamed text: held-back prefixes, cuts, earliest match."""

import pytest

from edge_sdk.runtime.generate.stopping import StopMatcher


def feed_all(stops, pieces):
    m = StopMatcher(tuple(stops))
    out = [m.feed(p) for p in pieces]
    return "".join(out) + m.flush(), m.stopped, out


def test_no_stop_passes_text_through():
    assert feed_all([], ["ab", "cd"])[:2] == ("abcd", False)


@pytest.mark.parametrize("pieces", [["Hello END rest"], ["Hello E", "N", "D rest"], list("Hello END rest")])
def test_cut_at_stop_however_split(pieces):
    text, stopped, _ = feed_all(["END"], pieces)
    assert (text, stopped) == ("Hello ", True)


def test_partial_prefix_held_then_released():
    m = StopMatcher(("END",))
    assert m.feed("abc E") == "abc "
    assert m.feed("N") == ""
    assert m.feed("x") == "ENx"
    assert m.flush() == "" and not m.stopped


def test_held_prefix_released_at_end():
    assert feed_all(["END"], ["abc EN"])[:2] == ("abc EN", False)


def test_earliest_of_several_stops():
    assert feed_all(["\n\n", "User:"], ["a User: b\n\nc"])[:2] == ("a ", True)


def test_nothing_after_stop():
    m = StopMatcher(("X",))
    m.feed("aXb")
    assert m.feed("more") == "" and m.flush() == ""
