"""Masks and eviction segments of a NAMM layer as pure functions of tensors and integers (no model, no cache).

A NAMM layer stores, per (batch row, KV head), a different set of tokens; transformers' single mask for all
layers cannot describe that. These functions build what one layer needs from its storage metadata:
which chunk tokens are padding, whether a chunk continues the cached sequence, the mask of each query
over the stored slots, and where a chunk must be split so each row evicts exactly at its eviction points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_REUSED_CACHE = (
    "A NAMMCache serves one sequence (per batch row) from its start: call cache.reset() before a new prompt, "
    "and do not pass a cache used for another prompt."
)


def chunk_padding(padding_mask: torch.Tensor | None, q_length: int, tokens_seen: int, device: torch.device) -> torch.Tensor | None:
    """`(B, q)` bool, True where a token of the current chunk is padding.

    Args:
        padding_mask: the model's 2D attention mask `(B, tokens_seen)`, 1/True = real token, or None (no
            padding anywhere: then None is returned).
        q_length: tokens in the current chunk (the last `q_length` columns of the mask).
        tokens_seen: tokens the layer has seen, this chunk included; the mask must cover exactly these.
    """
    if padding_mask is None:
        return None
    if padding_mask.dim() != 2:
        raise ValueError("NAMMCache needs a 2D attention mask (batch, sequence); got a prepared 4D mask.")
    if padding_mask.shape[-1] != tokens_seen:
        raise RuntimeError(
            f"This NAMMCache has seen {tokens_seen} tokens but the attention mask covers {padding_mask.shape[-1]}. "
            + _REUSED_CACHE
        )
    return ~padding_mask[:, -q_length:].to(device=device, dtype=torch.bool)


def check_chunk_positions(
    position_ids: torch.Tensor | None,
    new_is_padding: torch.Tensor | None,
    real_tokens_seen: Sequence[int],
    tokens_seen: int,
) -> None:
    """Refuse a chunk whose position ids do not continue the cached sequence (a reused cache).

    The last real token of each row must sit at that row's real-token count (generate's padding-aware
    positions) or at the absolute index (positions counted over padding, as a bare forward does).

    Args:
        position_ids: `(B or 1, q)` or None (nothing to check).
        new_is_padding: `(B, q)` bool or None (no padding).
        real_tokens_seen: per batch row, real tokens seen before this chunk.
        tokens_seen: tokens seen, this chunk included.
    """
    if position_ids is None or position_ids.dim() != 2:
        return
    batch = len(real_tokens_seen)
    q_length = position_ids.shape[-1]
    last = position_ids[:, -1].tolist()
    if new_is_padding is None:
        real_in_chunk, last_is_padding = [q_length] * batch, [False] * batch
    else:
        real_in_chunk = (~new_is_padding).sum(-1).tolist()
        last_is_padding = new_is_padding[:, -1].tolist()
    for b in range(batch):
        row_last = last[b if len(last) > 1 else 0]
        if last_is_padding[b]:
            continue
        expected = {real_tokens_seen[b] + real_in_chunk[b] - 1, tokens_seen - 1}
        if row_last not in expected:
            raise RuntimeError(
                f"This NAMMCache has seen {tokens_seen} tokens, but the chunk's last position id is {row_last} "
                f"(expected {max(expected)}). " + _REUSED_CACHE
            )


def heads_hold_the_same_slots(positions: torch.Tensor, token_valid: torch.Tensor) -> bool:
    """Whether every KV head of every row holds the same tokens in the same slots (`(B, H, S)` each)."""
    if positions.shape[1] == 1:
        return True
    return bool((positions == positions[:, :1]).all()) and bool((token_valid == token_valid[:, :1]).all())


def attention_bias(
    positions: torch.Tensor,
    token_valid: torch.Tensor,
    query_positions: torch.Tensor | None,
    query_heads: int,
    dtype: torch.dtype,
    grouped: bool = False,
    uniform_heads: bool | None = None,
) -> torch.Tensor:
    """Mask of queries at `query_positions` over the stored slots.

    A slot is visible to a query iff it holds a real token of that (row, head) at a position <= the
    query's: stored tokens, padding, per-head eviction and causality inside the chunk in one rule,
    whatever the slot layout. Masked entries get the dtype's minimum, like transformers' eager masks.

    Args:
        positions: `(B, H, S)` absolute position of each slot's token.
        token_valid: `(B, H, S)` bool, False for empty slots and padding tokens.
        query_positions: `(q,)` absolute positions of the queries, or None for one query at a position after
            every stored token (a decode step), which sees every valid slot.
        query_heads: query heads of the attention call (a multiple of H).
        uniform_heads: whether every head holds the same slots (`heads_hold_the_same_slots`), if the caller
            tracks it; None checks here (a host sync on GPU).

    Returns:
        `(B, 1 or query_heads, q, S)` additive mask in `dtype` (1 when every head holds the same slots);
        with `grouped`, a bool mask `(B, 1 or H, 1, q, S)`, True = hidden (one mask per KV head, broadcast
        over its query heads, applied with `masked_fill_`; see `attention.grouped_eager_attention`).
    """
    batch, heads, slots = token_valid.shape
    valid = token_valid
    if uniform_heads is None:
        uniform_heads = heads_hold_the_same_slots(positions, valid)
    uniform_heads = heads == 1 or uniform_heads
    if uniform_heads:
        valid, positions = valid[:, :1], positions[:, :1]
    if grouped:
        if query_positions is None:
            return (~valid)[:, :, None, None]
        hidden = (positions.unsqueeze(2) > query_positions.view(1, 1, -1, 1)).logical_or_(~valid.unsqueeze(2))
        return hidden.unsqueeze(2)
    if query_positions is None:
        allowed = valid.unsqueeze(2)
    else:
        allowed = valid.unsqueeze(2) & (positions.unsqueeze(2) <= query_positions.view(1, 1, -1, 1))
    if not uniform_heads and query_heads != heads:
        groups = query_heads // heads
        q_length = allowed.shape[2]
        allowed = allowed.unsqueeze(2).expand(batch, heads, groups, q_length, slots).reshape(batch, query_heads, q_length, slots)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def segment_ends(
    new_is_padding: torch.Tensor | None,
    q_length: int,
    real_tokens_seen: Sequence[int],
    next_eviction: Sequence[int],
    interval: int,
) -> list[int]:
    """Where to split a chunk's queries so that each row evicts exactly at its eviction points.

    A row reaches an eviction point after a given number of its own real tokens; with left padding (or
    chunks longer than `interval`) that can fall inside a chunk.

    Args:
        new_is_padding: `(B, q_length)` bool, True for padding queries, or None (every query real).
        real_tokens_seen: per batch row, real tokens seen before this chunk.
        next_eviction: per batch row, the real-token count of its next eviction point (later points
            follow every `interval` real tokens).

    Returns:
        Sorted exclusive ends; the last is always `q_length` (an eviction point there is handled by the
        next `update`).
    """
    ends = {q_length}
    if new_is_padding is None:  # every query is real: eviction points in plain arithmetic
        for seen, point in zip(real_tokens_seen, next_eviction):
            end = point - seen
            while end < q_length:
                ends.add(end)
                end += interval
        return sorted(ends)
    real_counts = (~new_is_padding).cumsum(-1)
    for b in range(new_is_padding.shape[0]):
        target = next_eviction[b]
        reached = real_tokens_seen[b] + real_counts[b]
        while True:
            hits = (reached == target) & ~new_is_padding[b]
            if not bool(hits.any()):
                break
            ends.add(int(hits.nonzero()[0]) + 1)
            target += interval
    return sorted(ends)
