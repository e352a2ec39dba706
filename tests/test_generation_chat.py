"""DeepSeek-R1 chat format: built-in renderer against the Jinja template, <think> splitting."""

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.chat import DEEPSEEK_R1_TEMPLATE, ThinkSplit, render_r1, render_template, split_think

BOS = "<｜begin▁of▁sentence｜>"

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
     {"role": "user", "content": "and 3+3?"}],
]


def test_r1_prompt_format():
    assert render_r1(CONVERSATIONS[1], bos_token=BOS) == f"{BOS}Be brief.<｜User｜>2+2?<｜Assistant｜><think>\n"


def test_earlier_reasoning_not_fed_back():
    text = render_r1(CONVERSATIONS[2], bos_token=BOS)
    assert "add" not in text and "<｜Assistant｜>\n\n4<｜end▁of▁sentence｜><｜User｜>and 3+3?" in text


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_builtin_renderer_equals_jinja_template(messages, gen):
    assert render_r1(messages, bos_token=BOS, add_generation_prompt=gen) == \
        render_template(DEEPSEEK_R1_TEMPLATE, messages, bos_token=BOS, add_generation_prompt=gen)


@pytest.mark.parametrize("bad", [[], [{"role": "robot", "content": "x"}], [{"role": "user"}], "hi"])
def test_bad_messages(bad):
    with pytest.raises(ConfigError):
        render_r1(bad)


def test_broken_template_is_config_error():
    with pytest.raises(ConfigError, match="chat template"):
        render_template("{% for %}", CONVERSATIONS[0])


GEN = "Let me add.\n2+2 is 4.\n</think>\n\nThe answer is 4."


def test_split_think():
    assert split_think(GEN) == ("Let me add.\n2+2 is 4.", "The answer is 4.")
    assert split_think("no reasoning here", starts_in_think=False) == ("", "no reasoning here")
    assert split_think("<think>a</think>b", starts_in_think=False) == ("a", "b")


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_streamed_split_equals_whole(size):
    s = ThinkSplit()
    r, a = "", ""
    for i in range(0, len(GEN), size):
        x, y = s.feed(GEN[i:i + size])
        r, a = r + x, a + y
    x, y = s.flush()
    assert (r + x, a + y) == ("Let me add.\n2+2 is 4.\n", "\n\nThe answer is 4.")
