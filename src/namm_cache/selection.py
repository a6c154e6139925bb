"""From scores to kept tokens: threshold, hard cap, the newest-token rule, and storage compaction."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_tokens(
    scores: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    *,
    threshold: float | None = 0.0,
    max_tokens: int | torch.Tensor | None = None,
    min_tokens: int | torch.Tensor | None = None,
    sinks: int = 0,
    recent_window: int = 0,
    neighbours: int = 0,
    smoothing: int = 0,
) -> torch.Tensor:
    """Decide which tokens to keep.

    Args:
        scores: `(N, S)` scores, higher = keep. Must be finite where `valid`.
        valid: `(N, S)` bool, False for empty slots and padding tokens (never kept).
        positions: `(N, S)` absolute positions; the newest valid token of each row is always kept.
        threshold: keep tokens with `score >= threshold` (None: no threshold, only the cap applies).
        max_tokens: keep at most this many per row, the highest-scoring ones (the newest counts first); an
            int for every row or a `(N,)` tensor of per-row counts.
        min_tokens: keep at least this many per row, in the order `max_tokens` ranks by (the newest, the
            protected tokens, then the highest scores), even below the threshold; an int or `(N,)` tensor.
            `max_tokens` still caps the result.
        sinks: the oldest this many valid tokens of each row are kept whatever their score.
        recent_window: tokens younger than this (newest position minus position < `recent_window`) are kept
            whatever their score. Protected tokens count toward `max_tokens` and rank above every other
            token but the newest; if a cap is smaller than a row's protected tokens, it keeps the newest, then
            the sinks (oldest first), then the recent window (newest first), as StreamingLLM would: a small
            fraction budget early in a prompt must not trade the attention sinks for a score.
        neighbours: with `k > 0`, each valid token is ranked by the highest score among itself and the `k`
            valid tokens on either side of it in position order (`spread_scores`), so that a token worth
            keeping keeps the words around it: a fact survives as a phrase, not as scattered tokens.
        smoothing: with `m > 0`, each valid token's score is first replaced by the mean score of itself and
            the `m` valid tokens on either side of it in position order (`smooth_scores`); `neighbours` then
            spreads the means. A sentence whose tokens all score moderately high outranks a lone spike.

    Returns:
        `(N, S)` bool keep mask (a subset of `valid`).
    """
    if scores.shape != valid.shape or positions.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)}, valid {tuple(valid.shape)} and positions "
                         f"{tuple(positions.shape)} must have the same shape.")
    if not torch.isfinite(scores[valid]).all():
        raise ValueError(
            "The scorer returned NaN or inf scores for real tokens; refusing to evict on them. Check the scorer's "
            "parameters and normalisation statistics (std must be > 0)."
        )
    order = _position_order(valid, positions) if smoothing or neighbours else None  # sorted once for both
    if smoothing:
        scores = smooth_scores(scores, valid, positions, smoothing, order=order)
    if neighbours:
        scores = spread_scores(scores, valid, positions, neighbours, order=order)
    keep = valid.clone() if threshold is None else valid & (scores >= threshold)
    has_token = valid.any(-1)
    newest = torch.where(valid, positions, torch.full_like(positions, -1)).argmax(-1)
    rows = torch.arange(valid.shape[0], device=valid.device)
    keep[rows[has_token], newest[has_token]] = True
    sink = protected_tokens(valid, positions, sinks=sinks)
    window = protected_tokens(valid, positions, recent_window=recent_window)
    if sink is not None and window is not None:
        window &= ~sink  # a token in both ranks as a sink
    for protected in (sink, window):
        if protected is not None:
            keep |= protected
    if min_tokens is not None or max_tokens is not None:
        special = (rows[has_token], newest[has_token])
    if min_tokens is not None:
        floor = torch.as_tensor(min_tokens, device=keep.device).expand(keep.shape[0])
        if bool((floor > keep.sum(-1)).any()):
            keep |= valid & (_ranks(valid, scores, positions, sink, window, special) < floor.unsqueeze(-1))
    if max_tokens is not None:
        limit = torch.as_tensor(max_tokens, device=keep.device).expand(keep.shape[0])
        if bool((limit < keep.sum(-1)).any()):
            keep &= _ranks(keep, scores, positions, sink, window, special) < limit.unsqueeze(-1)
    return keep


def _position_order(valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`(N, S)` slot indices that put each row's valid tokens first, in position order."""
    big = torch.iinfo(positions.dtype).max
    return torch.where(valid, positions, torch.full_like(positions, big)).argsort(dim=-1, stable=True)


def spread_scores(scores: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, neighbours: int, *,
                  order: torch.Tensor | None = None) -> torch.Tensor:
    """`(N, S)` scores where each valid token takes the highest score among itself and the `neighbours` valid
    tokens before and after it in position order (a running maximum over a window of `2 * neighbours + 1`
    held tokens; slots that are not valid neither give nor take). Invalid slots keep their score. `order`:
    `_position_order(valid, positions)`, when the caller has it."""
    if neighbours <= 0 or scores.shape[-1] == 0:
        return scores
    order = _position_order(valid, positions) if order is None else order
    packed = scores.gather(-1, order).to(torch.float32).masked_fill(~valid.gather(-1, order), float("-inf"))
    width = 2 * neighbours + 1
    spread = F.max_pool1d(packed.unsqueeze(1), width, stride=1, padding=neighbours).squeeze(1)
    spread = torch.empty_like(spread).scatter_(-1, order, spread).to(scores.dtype)
    return torch.where(valid, spread, scores)


def smooth_scores(scores: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, smoothing: int, *,
                  order: torch.Tensor | None = None) -> torch.Tensor:
    """`(N, S)` scores where each valid token takes the mean score of itself and the `smoothing` valid tokens
    before and after it in position order (a running mean over a window of `2 * smoothing + 1` held tokens,
    fewer at a row's ends; slots that are not valid neither give nor take). Invalid slots keep their score.
    Computed in float32 and clamped into each window's range, so a window of equal scores keeps that score
    exactly (a run of tokens at the threshold stays at it). `order` as in `spread_scores`."""
    if smoothing <= 0 or scores.shape[-1] == 0:
        return scores
    order = _position_order(valid, positions) if order is None else order
    held = valid.gather(-1, order).unsqueeze(1)
    packed = scores.gather(-1, order).to(torch.float32).unsqueeze(1)
    width = 2 * smoothing + 1
    pool = dict(kernel_size=width, stride=1, padding=smoothing)
    # the window means of the scores and of the held flags share one divisor, which cancels: their ratio is the
    # mean over the held tokens alone (valid slots are packed first, so a window reaches held tokens only)
    total = F.avg_pool1d(packed.masked_fill(~held, 0.0), count_include_pad=False, **pool)
    count = F.avg_pool1d(held.to(torch.float32), count_include_pad=False, **pool)
    mean = total / count.clamp_min(torch.finfo(torch.float32).tiny)
    low = -F.max_pool1d(-packed.masked_fill(~held, float("inf")), **pool)
    high = F.max_pool1d(packed.masked_fill(~held, float("-inf")), **pool)
    mean = torch.minimum(torch.maximum(mean, low), high).squeeze(1)
    mean = torch.empty_like(mean).scatter_(-1, order, mean).to(scores.dtype)
    return torch.where(valid, mean, scores)


def _ranks(candidates: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, sink: torch.Tensor | None,
           window: torch.Tensor | None, newest: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`(N, S)` each candidate's rank in its row (0 = kept first): the newest token, then the sinks oldest first,
    then the recent window newest first, then the rest by score. Non-candidates rank after every candidate."""
    ranked = torch.where(candidates, scores.to(torch.float32), torch.full(scores.shape, float("-inf"), device=scores.device))
    # groups: the newest (3), sinks oldest first (2), the window newest first (1), the rest by score (0)
    priority = torch.zeros(candidates.shape, dtype=torch.int8, device=candidates.device)
    if window is not None:
        ranked = torch.where(window, positions.to(torch.float32), ranked)
        priority[window] = 1
    if sink is not None:
        ranked = torch.where(sink, -positions.to(torch.float32), ranked)
        priority[sink] = 2
    ranked[newest] = float("inf")
    priority[newest] = 3
    priority[~candidates] = -1
    order = ranked.argsort(dim=-1, descending=True, stable=True)  # within each group: its own order
    order = order.gather(-1, priority.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=candidates.device).expand_as(order))
    return rank


def protected_tokens(valid: torch.Tensor, positions: torch.Tensor, *, sinks: int = 0, recent_window: int = 0) -> torch.Tensor | None:
    """`(N, S)` bool: the valid tokens `select_tokens` keeps whatever their score (the `sinks` oldest of each row
    and those younger than `recent_window`), or None when neither is asked for."""
    if not sinks and not recent_window:
        return None
    protected = torch.zeros_like(valid)
    if recent_window:
        newest = torch.where(valid, positions, torch.full_like(positions, -1)).amax(-1, keepdim=True)
        protected |= newest - positions < recent_window
    if sinks:
        big = torch.iinfo(positions.dtype).max
        oldest = torch.where(valid, positions, torch.full_like(positions, big)).topk(min(sinks, positions.shape[-1]), dim=-1, largest=False).values[..., -1:]
        protected |= positions <= oldest
    return protected & valid


def compaction_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices that move each row's kept slots to the front, in their original order.

    Args:
        keep: `(N, S)` bool.

    Returns:
        `index`: `(N, S_new)` slot indices to gather, `S_new = max kept per row` (at least 0);
        `slot_valid`: `(N, S_new)` bool, False for the padding slots of rows that keep fewer.
    """
    counts = keep.sum(-1)
    new_length = int(counts.max().item()) if keep.numel() else 0
    # A stable sort on "not kept" lists kept slots first, each group in slot (= chronological) order.
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :new_length]
    slot_valid = torch.arange(new_length, device=keep.device).unsqueeze(0) < counts.unsqueeze(-1)
    return order, slot_valid
