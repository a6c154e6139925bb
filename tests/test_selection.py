"""Selection rules: threshold, newest token, hard cap, compaction order."""

from __future__ import annotations

import pytest
import torch

from namm_cache.selection import compaction_indices, select_tokens


def test_threshold_keeps_scores_at_or_above_zero_and_the_newest():
    scores = torch.tensor([[0.5, -1.0, 0.0, -0.1, -2.0]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    positions = torch.arange(5)[None]
    keep = select_tokens(scores, valid, positions)
    assert keep.tolist() == [[True, False, True, False, True]]  # index 4 is the newest


def test_invalid_slots_are_never_kept_and_newest_is_by_position():
    scores = torch.tensor([[5.0, 5.0, -1.0, -1.0]])
    valid = torch.tensor([[True, False, True, True]])
    positions = torch.tensor([[0, 9, 7, 3]])  # newest valid token sits in slot 2
    keep = select_tokens(scores, valid, positions)
    assert keep.tolist() == [[True, False, True, False]]


def test_cap_keeps_the_top_scores_with_the_newest_first():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.5, -5.0]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    keep = select_tokens(scores, valid, torch.arange(5)[None], threshold=None, max_tokens=2)
    assert keep.tolist() == [[True, False, False, False, True]]


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        select_tokens(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2, dtype=torch.bool), torch.arange(2)[None])


def test_nan_in_empty_slots_is_ignored():
    keep = select_tokens(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[False, True]]), torch.arange(2)[None])
    assert keep.tolist() == [[False, True]]


def test_compaction_keeps_chronological_order_and_marks_padding():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    order, slot_valid = compaction_indices(keep)
    assert order.shape == (2, 3)
    assert order[0].tolist() == [0, 2, 3]
    assert order[1, 0].item() == 1
    assert slot_valid.tolist() == [[True, True, True], [True, False, False]]
