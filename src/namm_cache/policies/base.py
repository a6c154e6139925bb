"""The one contract every eviction policy follows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budgets import Budget, ThresholdBudget
from ..config import NAMMConfig

# What a layer can track per token for a policy, from the attention probabilities it observes.
SPECTROGRAM = "spectrogram"  # EMA of the attention STFT (NAMM)
ATTENTION_SUM = "attention_sum"  # attention received, summed over every query since the token arrived (H2O)
LAST_ATTENTION = "last_attention"  # attention from the newest query (TOVA)
WINDOW_ATTENTION = "window_attention"  # attention summed over the last `window` queries before eviction (SnapKV)
TRACKERS = (ATTENTION_SUM, LAST_ATTENTION, WINDOW_ATTENTION)


@dataclass
class Observation:
    """What a policy sees of one layer when it scores, one row per (batch row, KV head) being scored.

    Attributes:
        layer_idx: the model layer.
        keys: `(N, S, head_dim)` cached (post-RoPE) keys.
        positions: `(N, S)` absolute positions of the cached tokens.
        valid: `(N, S)` bool, False for empty storage slots, padding tokens and tokens not yet arrived.
        age: `(N, S)` newest position minus each token's position.
        spectrogram: `(N, S, n_bins)` EMA of each token's attention spectrogram (zeros if not tracked).
        config: the cache's `NAMMConfig`.
        budget: `(N,)` tokens each row may keep, or None under a threshold budget.
        attention_sum, last_attention, window_attention: `(N, S)` trackers, None unless the policy needs them.
        eviction_round: `(N,)` how many eviction rounds each row's batch row ran before this one.
        batch_rows: `(N,)` the batch row of each observation row.
        head_index: `(N,)` the KV head of each observation row.
    """

    layer_idx: int
    keys: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    age: torch.Tensor
    spectrogram: torch.Tensor
    config: NAMMConfig
    budget: torch.Tensor | None = None
    attention_sum: torch.Tensor | None = None
    last_attention: torch.Tensor | None = None
    window_attention: torch.Tensor | None = None
    eviction_round: torch.Tensor | None = None
    batch_rows: torch.Tensor | None = None
    head_index: torch.Tensor | None = None


class Policy:
    """An eviction policy: `score(observation) -> (N, S)` float scores, higher = keep.

    The cache keeps, per (batch row, KV head), the highest-scoring tokens within the budget (or, under a
    threshold budget, those scoring >= the threshold), and always the newest token.

    Class attributes:
        name: registry name (`NAMMCache(policy=name)`).
        needs: which per-token statistics the layer must track from observed attention.
        supports_threshold: whether scores have a calibrated zero, so a threshold budget makes sense.
        window: queries in the observation window (`WINDOW_ATTENTION` only).
    """

    name: str = "policy"
    needs: frozenset[str] = frozenset()
    supports_threshold: bool = False
    window: int = 0

    def constant_score(self) -> float | None:
        """If every token would get the same score whatever the observation, that score; else None.

        A layer whose policy scores constantly does not need attention probabilities, so it runs the
        model's fast attention (sdpa) without observing.
        """
        return None

    def check_budget(self, budget: Budget | None) -> Budget:
        """Return the budget to use, or raise `ValueError` if this policy cannot run with it."""
        if budget is None or isinstance(budget, ThresholdBudget):
            if not self.supports_threshold:
                raise ValueError(
                    f"Policy {self.name!r} has no calibrated score threshold; give it a token budget "
                    "(budget=512) or a fraction of tokens seen (budget=0.25)."
                )
            return budget or ThresholdBudget()
        return budget

    def score(self, observation: Observation) -> torch.Tensor:
        raise NotImplementedError


def rank_by_position(positions: torch.Tensor, valid: torch.Tensor, *, newest_first: bool) -> torch.Tensor:
    """`(N, S)` rank of each valid token by position within its row (0 = newest or oldest); invalid = S."""
    big = torch.iinfo(positions.dtype).max
    key = torch.where(valid, -positions if newest_first else positions, torch.full_like(positions, big))
    order = key.argsort(dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return torch.where(valid, rank, torch.full_like(rank, positions.shape[-1]))


# A bonus that puts protected tokens (sinks, recent windows) above any attention-based score.
PROTECTED = 1.0e9
