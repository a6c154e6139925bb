"""The one contract every eviction policy follows."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from ..budgets import Budget, ThresholdBudget
from ..config import NAMMConfig
from ..statistics import STATISTICS, check_needs


class Observation:
    """What a policy sees of one layer when it scores, one row per (batch row, KV head) being scored.

    Attributes:
        layer_idx: the model layer.
        keys, values: `(N, S, head_dim)` cached keys (post-RoPE) and values.
        positions: `(N, S)` absolute positions of the cached tokens.
        valid: `(N, S)` bool, False for empty storage slots, padding tokens and tokens not yet arrived.
        age: `(N, S)` newest position minus each token's position.
        config: the cache's `NAMMConfig`.
        budget: `(N,)` tokens each row may keep, or None under a threshold budget.
        statistics: `{name: (N, S, ...)}`, each statistic the policy needs (`namm_cache.statistics`), e.g.
            `statistics["spectrogram"]` `(N, S, n_bins)`, `statistics["attention_sum"]` `(N, S)`. Also
            readable as attributes (`observation.attention_sum`; None when not tracked).
        eviction_round: `(N,)` how many eviction rounds each row's batch row ran before this one.
        batch_rows: `(N,)` the batch row of each observation row.
        head_index: `(N,)` the KV head of each observation row.
        pooled_key_norm: `(N, S)` each token's pooled key norm (`namm_cache.ledger`), given when the policy
            reads it (`Policy.reads_pooled_key_norm`), else None.

    Statistics may also be given as keyword arguments: `Observation(..., attention_sum=tensor)`.
    """

    def __init__(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        age: torch.Tensor,
        config: NAMMConfig,
        budget: torch.Tensor | None = None,
        *,
        values: torch.Tensor | None = None,
        statistics: dict[str, torch.Tensor] | None = None,
        eviction_round: torch.Tensor | None = None,
        batch_rows: torch.Tensor | None = None,
        head_index: torch.Tensor | None = None,
        pooled_key_norm: torch.Tensor | None = None,
        **named_statistics: torch.Tensor,
    ):
        unknown = sorted(set(named_statistics) - set(STATISTICS))
        if unknown:
            raise TypeError(f"Observation got unknown field(s) {unknown}; statistics known: {sorted(STATISTICS)}.")
        self.layer_idx = layer_idx
        self.keys = keys
        self.values = values
        self.positions = positions
        self.valid = valid
        self.age = age
        self.config = config
        self.budget = budget
        self.statistics = {**(statistics or {}), **named_statistics}
        self.eviction_round = eviction_round
        self.batch_rows = batch_rows
        self.head_index = head_index
        self.pooled_key_norm = pooled_key_norm

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not regular attributes: a statistic's name reads it.
        if name in STATISTICS:
            return self.__dict__.get("statistics", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@dataclass(frozen=True)
class Policy:
    """An eviction policy: `score(observation) -> (N, S)` float scores, higher = keep.

    The cache keeps, per (batch row, KV head), the highest-scoring tokens within the budget (or, under a
    threshold budget, those scoring >= the threshold), and always the newest token.

    Policies are frozen dataclasses: their fields are their settings (shown in `repr`, `settings()` and
    `NAMMCache.stats()`); subclasses check them in `__post_init__` (calling `super().__post_init__()`).

    Class attributes:
        name: registry name (`NAMMCache(policy=name)`).
        needs: names of the per-token statistics the layer must track from observed attention
            (`namm_cache.statistics.STATISTICS`); an unknown name is refused when the policy is built.
        supports_threshold: whether scores have a calibrated zero, so a threshold budget makes sense.
        reads_pooled_key_norm: whether `score` reads `observation.pooled_key_norm` (the cache then keeps a
            `namm_cache.ledger.KeyNormLedger` of every layer's key norms).
        pools_every_layer: with `reads_pooled_key_norm`, whether that value pools every layer's rows
            (`KeyNormLedger.pooled_all_layers`) instead of those of the scoring layer and the layers before it.
    """

    name: ClassVar[str] = "policy"
    needs: ClassVar[frozenset[str]] = frozenset()
    supports_threshold: ClassVar[bool] = False
    reads_pooled_key_norm: ClassVar[bool] = False
    pools_every_layer: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_needs(self)

    def _set(self, **settings: Any) -> None:
        """Store checked settings on the frozen instance (for `__post_init__`)."""
        for key, value in settings.items():
            object.__setattr__(self, key, value)

    def settings(self) -> dict[str, Any]:
        """`{field: value}` of this policy's settings; values other than numbers, strings and None by type name."""
        return {f.name: _describe(getattr(self, f.name)) for f in fields(self)}

    def constant_score(self) -> float | None:
        """If every token would get the same score whatever the observation, that score; else None.

        A layer whose policy scores constantly does not need attention probabilities, so it runs the
        model's fast attention (sdpa) without observing.
        """
        return None

    @classmethod
    def check_budget(cls, budget: Budget | None) -> Budget:
        """Return the budget to use, or raise `ValueError` if this kind of policy cannot run with it (a class
        method: `CacheSpec` checks a policy given by name before one is built)."""
        if budget is None or isinstance(budget, ThresholdBudget):
            if not cls.supports_threshold:
                raise ValueError(
                    f"Policy {cls.name!r} has no calibrated score threshold; give it a token budget "
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


def _describe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__
