"""The pure mask / segment functions of a NAMM layer, on hand-made tensors (no model)."""

from __future__ import annotations

import pytest
import torch

from namm_cache.masks import attention_bias, check_chunk_positions, chunk_padding, segment_ends


def reference_segment_ends(new_is_padding, real_tokens_seen, next_eviction, interval):
    """Walk the queries one by one: a segment ends after a real query that brings its row to an eviction point."""
    batch, q_length = new_is_padding.shape
    ends = {q_length}
    for b in range(batch):
        seen, point = real_tokens_seen[b], next_eviction[b]
        for i in range(q_length):
            if new_is_padding[b, i]:
                continue
            seen += 1
            if seen == point:
                ends.add(i + 1)
                point += interval
    return sorted(ends)


def test_segment_ends_without_padding_split_at_each_rows_points():
    # Row 0 evicts after 12 more tokens and then every 16; row 1 after 30.
    assert segment_ends(None, 40, real_tokens_seen=[20, 2], next_eviction=[32, 32], interval=16) == [12, 28, 30, 40]


def test_segment_ends_at_the_chunk_end_are_left_to_the_next_update():
    assert segment_ends(None, 12, real_tokens_seen=[20], next_eviction=[32], interval=16) == [12]


def test_segment_ends_count_only_real_tokens_of_each_row():
    padding = torch.tensor([[True] * 5 + [False] * 11, [False] * 16])
    # Row 0 reaches 8 real tokens at query 12 (5 padding + 8 real), row 1 at query 8.
    assert segment_ends(padding, 16, real_tokens_seen=[0, 0], next_eviction=[8, 8], interval=8) == [8, 13, 16]


@pytest.mark.parametrize("seed", range(20))
def test_segment_ends_match_a_query_by_query_walk(seed):
    generator = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 4, (1,), generator=generator))
    q_length = int(torch.randint(1, 60, (1,), generator=generator))
    interval = int(torch.randint(1, 20, (1,), generator=generator))
    padding = torch.rand(batch, q_length, generator=generator) < 0.3
    seen = torch.randint(0, 50, (batch,), generator=generator).tolist()
    points = [s + int(torch.randint(1, interval + 1, (1,), generator=generator)) for s in seen]
    expected = reference_segment_ends(padding, seen, points, interval)
    assert segment_ends(padding, q_length, seen, points, interval) == expected
    if not bool(padding.any()):
        assert segment_ends(None, q_length, seen, points, interval) == expected


def visible(positions, valid, query_positions):
    """`(B, H, q, S)` bool: the rule itself, written out entry by entry."""
    batch, heads, slots = valid.shape
    out = torch.zeros(batch, heads, len(query_positions), slots, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i, query in enumerate(query_positions.tolist()):
                for s in range(slots):
                    out[b, h, i, s] = bool(valid[b, h, s]) and int(positions[b, h, s]) <= query
    return out


def per_head_storage():
    positions = torch.tensor([[[0, 2, 5, 6, 7], [1, 3, 4, 6, 7]]])  # (1, 2 heads, 5 slots)
    valid = torch.tensor([[[True, True, True, True, True], [False, True, True, True, True]]])
    return positions, valid


def test_attention_bias_hides_later_tokens_invalid_slots_and_evicted_ones_per_head():
    positions, valid = per_head_storage()
    queries = torch.tensor([6, 7])
    bias = attention_bias(positions, valid, queries, query_heads=4, dtype=torch.float32)
    assert bias.shape == (1, 4, 2, 5)
    expected = visible(positions, valid, queries).repeat_interleave(2, dim=1)  # query head h*G+g reads KV head h
    assert torch.equal(bias == 0, expected)
    assert torch.all(bias[~expected] == torch.finfo(torch.float32).min)


def test_attention_bias_grouped_is_a_bool_mask_per_kv_head():
    positions, valid = per_head_storage()
    queries = torch.tensor([5, 6, 7])
    hidden = attention_bias(positions, valid, queries, query_heads=4, dtype=torch.float32, grouped=True)
    assert hidden.dtype == torch.bool and hidden.shape == (1, 2, 1, 3, 5)
    assert torch.equal(~hidden[:, :, 0], visible(positions, valid, queries))


def test_attention_bias_shares_one_mask_when_every_head_holds_the_same_slots():
    positions = torch.arange(4).expand(2, 3, 4).clone()
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    valid[1, :, 0] = False  # left padding of row 1, the same in every head
    queries = torch.tensor([2, 3])
    bias = attention_bias(positions, valid, queries, query_heads=6, dtype=torch.bfloat16)
    assert bias.shape == (2, 1, 2, 4) and bias.dtype == torch.bfloat16
    assert torch.equal(bias == 0, visible(positions, valid, queries)[:, :1])
    assert attention_bias(positions, valid, queries, query_heads=6, dtype=torch.float32, grouped=True).shape == (2, 1, 1, 2, 4)


def test_chunk_padding_reads_the_chunk_columns_of_a_2d_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert chunk_padding(None, 2, 5, torch.device("cpu")) is None
    assert chunk_padding(mask, 2, 5, torch.device("cpu")).tolist() == [[False, False], [False, True]]
    with pytest.raises(RuntimeError, match="seen 6 tokens but the attention mask covers 5"):
        chunk_padding(mask, 2, 6, torch.device("cpu"))
    with pytest.raises(ValueError, match="2D attention mask"):
        chunk_padding(mask.view(2, 1, 1, 5), 2, 5, torch.device("cpu"))


def test_chunk_positions_continue_the_row_or_the_padded_sequence():
    padding = torch.tensor([[True, False, False], [False, False, False]])
    # Row 0: 4 real tokens before + 2 now -> last real position 5 (padding-aware) or 9 (absolute).
    check_chunk_positions(torch.tensor([[0, 4, 5], [7, 8, 9]]), padding, real_tokens_seen=[4, 7], tokens_seen=10)
    check_chunk_positions(torch.tensor([[7, 8, 9]]), None, real_tokens_seen=[7, 7], tokens_seen=10)
    check_chunk_positions(None, padding, real_tokens_seen=[4, 7], tokens_seen=10)
    with pytest.raises(RuntimeError, match="last position id is 2"):
        check_chunk_positions(torch.tensor([[0, 1, 2]]), None, real_tokens_seen=[7], tokens_seen=10)
