"""Selection rules: threshold, newest token, hard cap, compaction order."""

from __future__ import annotations

import pytest
import torch

from namm_cache import BAMScorer, NAMMCache, NAMMConfig
from namm_cache.selection import compaction_indices, protected_tokens, select_tokens


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


def test_sinks_and_recent_window_are_kept_whatever_their_score():
    scores = torch.tensor([[-9.0, -9.0, 1.0, -9.0, 2.0, -9.0, -9.0, -9.0]])
    valid = torch.tensor([[False, True, True, True, True, True, True, True]])  # slot 0 is padding: not a sink
    positions = torch.arange(8)[None]
    keep = select_tokens(scores, valid, positions, sinks=2, recent_window=3)
    assert keep.tolist() == [[False, True, True, False, True, True, True, True]]
    assert select_tokens(scores, valid, positions).tolist() == [[False, False, True, False, True, False, False, True]]


def test_a_cap_counts_protected_tokens_first_then_the_best_scores():
    scores = torch.tensor([[-9.0, 5.0, 4.0, -9.0, -8.0, 3.0]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    positions = torch.arange(6)[None]
    keep = select_tokens(scores, valid, positions, threshold=None, max_tokens=4, sinks=1, recent_window=2)
    assert keep.tolist() == [[True, True, False, False, True, True]]  # sink, recent pair, then the best score
    # A cap below the protected count keeps the newest, then the sinks (oldest first), then the window (newest
    # first), whatever the scores: a small budget early in a prompt keeps the attention sink.
    keep = select_tokens(scores, valid, positions, threshold=None, max_tokens=2, sinks=1, recent_window=2)
    assert keep.tolist() == [[True, False, False, False, False, True]]
    keep = select_tokens(scores, valid, positions, threshold=None, max_tokens=3, sinks=1, recent_window=4)
    assert keep.tolist() == [[True, False, False, False, True, True]]
    keep = select_tokens(scores, valid, positions, threshold=None, max_tokens=3, sinks=4)  # the newest is not a sink
    assert keep.tolist() == [[True, True, False, False, False, True]]
    keep = select_tokens(scores, valid, positions, threshold=None, max_tokens=3, recent_window=5)
    assert keep.tolist() == [[False, False, False, True, True, True]]



def test_a_floor_keeps_at_least_min_tokens_in_the_caps_order_and_a_cap_still_bounds_it():
    scores = torch.tensor([[-9.0, -1.0, -3.0, 2.0, -2.0, -8.0, -7.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, 0] = False  # padding: never kept, not even by a floor
    positions = torch.arange(7).expand(2, -1)
    # Row 0: only slot 3 and the newest pass the threshold; a floor of 4 adds the sink (slot 1), then the best
    # scores left (-2.0 at slot 4 before -3.0 at slot 2). Row 1: every token passes already, the floor adds nothing.
    keep = select_tokens(scores, valid, positions, min_tokens=torch.tensor([4, 2]), sinks=1)
    assert keep.tolist() == [[False, True, False, True, True, False, True], [True] * 7]
    assert select_tokens(scores, valid, positions, min_tokens=2, sinks=1).tolist()[0] == \
        [False, True, False, True, False, False, True]  # the floor is met by what the threshold keeps
    # A cap below the floor wins: at most max_tokens, in the same order.
    keep = select_tokens(scores, valid, positions, min_tokens=5, max_tokens=3, sinks=1)
    assert keep.tolist() == [[False, True, False, True, False, False, True], [True, False, False, False, False, True, True]]


@pytest.mark.parametrize("min_fraction, held", [(None, 2), (0.3, 49)])
def test_a_cache_on_the_threshold_holds_its_floors_share_of_the_tokens_seen(min_fraction, held):
    """A scorer that scores every token below the threshold keeps only the newest at a round; with `min_fraction`
    0.3 the round at 160 tokens seen keeps ceil(0.3 x 160) = 48 in every (layer, head). The 161st token, fed
    after that round, is held besides."""
    from conftest import random_ids, tiny_model

    from namm_cache.scorers import LinearScorer

    scorer = LinearScorer()
    with torch.no_grad():
        scorer.readout.bias.fill_(-1.0)
    model = tiny_model("llama")
    cache = NAMMCache(model=model, scorer=scorer, config=NAMMConfig(update_interval=32, min_fraction=min_fraction))
    for part in random_ids(161).split(32, dim=1):
        model(input_ids=part, cache=cache, use_cache=True)
    counts = {int(layer.token_valid[0, head].sum()) for layer in cache.namm_layers for head in range(layer.keys.shape[1])}
    assert counts == {held}

def test_protected_tokens_follow_positions_not_slots():
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    positions = torch.tensor([[7, 2, 5, 0], [10, 11, 3, 4]])
    protected = protected_tokens(valid, positions, sinks=1, recent_window=2)
    assert protected.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert protected_tokens(valid, positions) is None


def test_a_cache_that_evicts_everything_else_keeps_sinks_and_the_recent_window():
    from conftest import random_ids, tiny_model

    model = tiny_model("llama")
    scorer = BAMScorer()
    with torch.no_grad():
        scorer.readout.bias.fill_(-1.0)  # every token scores below the threshold
    config = NAMMConfig(update_interval=32, sinks=4, recent_window=16)
    cache = NAMMCache(model=model, scorer=scorer, config=config)
    model(input_ids=random_ids(96), cache=cache, use_cache=True)
    # The last round ran at 64 tokens seen: 4 sinks + positions 48-63, then the 32 tokens since.
    expected = torch.tensor(list(range(4)) + list(range(48, 96)))
    for layer in cache.namm_layers:
        held = layer.positions[layer.token_valid].view(-1, len(expected))
        assert (held == expected).all()
    with pytest.raises(ValueError, match="recent_window"):
        NAMMConfig(recent_window=-1)
    # Saved only when set: a scorer saved without them stays readable by versions that do not know them.
    assert "sinks" not in NAMMConfig().to_dict() and NAMMConfig.from_dict(config.to_dict()) == config


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


def test_neighbours_spread_a_score_over_the_held_tokens_on_either_side_in_position_order():
    from namm_cache.selection import spread_scores

    scores = torch.tensor([[0.0, 5.0, 7.0, 0.0, 0.0, 0.0, 9.0, 0.0]])
    valid = torch.tensor([[True, True, False, True, True, True, True, True]])
    positions = torch.tensor([[7, 6, 5, 4, 3, 2, 1, 0]])  # slots newest first; slot 2 is not held
    spread = spread_scores(scores, valid, positions, 1)
    # slot 1 (position 6) reaches positions 7 and 4 across the empty slot; the empty slot neither gives its 7
    # nor takes anything; position 1's 9 reaches positions 2 and 0.
    assert spread.tolist() == [[5.0, 5.0, 7.0, 5.0, 0.0, 9.0, 9.0, 9.0]]
    assert spread_scores(scores, valid, positions, 2)[0, 4].item() == 9.0  # position 3 sees position 1


def test_with_neighbours_a_kept_token_keeps_its_phrase_under_a_threshold_and_a_cap():
    scores = torch.tensor([[-1.0, -1.0, -1.0, 2.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    valid = torch.ones(1, 10, dtype=torch.bool)
    positions = torch.arange(10)[None]
    assert select_tokens(scores, valid, positions).nonzero()[:, 1].tolist() == [3, 9]
    assert select_tokens(scores, valid, positions, neighbours=2).nonzero()[:, 1].tolist() == [1, 2, 3, 4, 5, 9]
    capped = select_tokens(scores, valid, positions, threshold=None, max_tokens=4, neighbours=1)
    assert capped.nonzero()[:, 1].tolist() == [2, 3, 4, 9]  # the newest, then the phrase around the best score
    assert select_tokens(scores, valid, positions, neighbours=0).equal(select_tokens(scores, valid, positions))


def test_smoothing_averages_a_score_over_the_held_tokens_on_either_side_in_position_order():
    from namm_cache.selection import smooth_scores

    scores = torch.tensor([[0.0, 6.0, float("nan"), 3.0, 0.0, 0.0, 9.0, 0.0]])
    valid = torch.tensor([[True, True, False, True, True, True, True, True]])
    positions = torch.tensor([[7, 4, 5, 6, 3, 2, 1, 0]])  # slots in no order; slot 2 is not held (and NaN)
    smooth = smooth_scores(scores, valid, positions, 1)
    # in position order the held scores are 0, 9, 0, 0, 6, 3, 0 (positions 0-4, 6, 7): each token takes the mean of
    # itself and one held token either side, two at the row's ends; the empty slot neither gives nor takes.
    by_position = {int(p): float(s) for p, s, v in zip(positions[0], smooth[0], valid[0]) if v}
    assert by_position == pytest.approx({0: 4.5, 1: 3.0, 2: 3.0, 3: 2.0, 4: 3.0, 6: 3.0, 7: 1.5})
    assert torch.isnan(smooth[0, 2])  # an invalid slot keeps its score
    assert smooth_scores(scores, valid, positions, 0) is scores
    # a window of equal scores keeps that score exactly: a run at the threshold stays kept
    level = torch.full((1, 40), -0.2)
    assert select_tokens(level, torch.ones(1, 40, dtype=torch.bool), torch.arange(40)[None], threshold=-0.2, smoothing=8).all()


def test_with_smoothing_a_run_of_moderate_scores_outranks_a_lone_spike():
    # a spike of 3 at position 5; a run of five 1s at positions 10-14; -1 elsewhere
    scores = torch.full((1, 20), -1.0)
    scores[0, 5] = 3.0
    scores[0, 10:15] = 1.0
    valid = torch.ones(1, 20, dtype=torch.bool)
    positions = torch.arange(20)[None]
    capped = select_tokens(scores, valid, positions, threshold=None, max_tokens=4)
    assert capped.nonzero()[:, 1].tolist()[0] == 5  # by its own score the spike is kept after the newest
    smoothed = select_tokens(scores, valid, positions, threshold=0.0, smoothing=2)
    # windows of 5: around the spike (3 - 4) / 5 < 0; positions 10-14 average 1/5, 3/5, 1, 3/5, 1/5, positions 9
    # and 15 -1/5; the newest is kept whatever its score
    assert smoothed.nonzero()[:, 1].tolist() == [10, 11, 12, 13, 14, 19]
    capped = select_tokens(scores, valid, positions, threshold=None, max_tokens=4, smoothing=2)
    assert capped.nonzero()[:, 1].tolist() == [11, 12, 13, 19]  # a cap ranks by the means too
    both = select_tokens(scores, valid, positions, threshold=0.0, smoothing=2, neighbours=1)
    assert both.nonzero()[:, 1].tolist() == [9, 10, 11, 12, 13, 14, 15, 19]
