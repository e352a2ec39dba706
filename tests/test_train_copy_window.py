"""scripts/train_tiny.py --size copy: the windows that repeat a span (pure functions, no training),
and the default recipe's fingerprint, which the copy recipe must leave as it was."""

from __future__ import annotations

import hashlib
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from train_tiny import CORPUS, PARTS, RECIPE, copy_window, fingerprint  # noqa: E402

IDS = list(range(100, 200))  # token i of the "corpus" is 100 + i: every position is recognisable


def test_window_is_text_before_then_span_gap_repeat():
    w = copy_window(IDS, start=20, span=5, gap=2, seqlen=16)
    assert w == [116, 117, 118, 119,  # the text before the span fills the window
                 120, 121, 122, 123, 124,  # the span
                 125, 126,  # the gap: the text that follows it
                 120, 121, 122, 123, 124]  # the repeat


def test_rename_inserts_the_new_token_after_each_occurrence_in_the_repeat_only():
    ids = [7, 7, 7, 1, 2, 1, 3, 9, 9]
    w = copy_window(ids, start=3, span=4, gap=1, seqlen=13, rename=(1, 50))
    assert w == [7, 7, 1, 2, 1, 3, 9, 1, 50, 2, 1, 50, 3]
    assert w[2:6] == ids[3:7]  # the first copy is the corpus text as it is


def test_order_shuffles_the_span_alike_in_both_copies():
    w = copy_window(IDS, start=30, span=4, gap=1, seqlen=12, order=[2, 0, 3, 1])
    assert w == [127, 128, 129, 132, 130, 133, 131, 134, 132, 130, 133, 131]


def test_a_long_span_is_cut_to_the_window_length():
    w = copy_window(IDS, start=10, span=12, gap=3, seqlen=20)
    assert w == IDS[10:25] + IDS[10:15]


def test_a_start_without_enough_text_before_it_is_refused():
    with pytest.raises(ValueError, match="start at 6 or later"):
        copy_window(IDS, start=2, span=4, gap=2, seqlen=16)


def test_sampled_windows_are_deterministic_and_repeat_a_span():
    torch = pytest.importorskip("torch")
    from train_tiny import sample_copy_window

    ids = torch.arange(5000) % 977  # no 8-gram repeats within 977 tokens in the plain text
    a = [sample_copy_window(ids, 128, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1] and len(a[0]) == 128
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = sample_copy_window(ids, 128, g)
        assert len(w) == 128
        grams = [tuple(w[i:i + 8]) for i in range(len(w) - 7)]
        assert len(set(grams)) < len(grams), "a copy window holds a repeated 8-gram"


def test_the_default_recipe_fingerprint_is_the_one_before_the_copy_size():
    args = Namespace(steps=400, batch=16, seqlen=128, vocab=2048, seed=0, size="small", copy_mix=0.0)
    h = hashlib.sha256(f"recipe={RECIPE} steps=400 batch=16 seqlen=128 vocab=2048 seed=0".encode())
    for part in PARTS:
        h.update((CORPUS / f"{part}.txt.xz").read_bytes())
    assert fingerprint(args) == h.hexdigest()
    copy = Namespace(**{**vars(args), "size": "copy", "copy_mix": 0.5})
    assert fingerprint(copy) not in (h.hexdigest(), fingerprint(Namespace(**{**vars(copy), "copy_mix": 0.25})))
