"""How many tokens a policy may keep: a fixed count, a fraction of tokens seen, or NAMM's threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class TokenBudget:
    """Keep at most `tokens` tokens per (batch row, KV head) of each layer after every eviction round."""

    tokens: int

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"A token budget must be a positive integer, got {self.tokens!r}.")

    def tokens_for(self, real_tokens_seen: int) -> int:
        return self.tokens

    def describe(self) -> str:
        return f"{self.tokens} tokens"


@dataclass(frozen=True)
class FractionBudget:
    """Keep at most `ceil(fraction * tokens seen)` tokens per (batch row, KV head) of each layer."""

    fraction: float

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"A fraction budget must be in (0, 1], got {self.fraction!r}.")

    def tokens_for(self, real_tokens_seen: int) -> int:
        return max(1, math.ceil(self.fraction * real_tokens_seen))

    def describe(self) -> str:
        return f"{self.fraction:.0%} of tokens seen"


@dataclass(frozen=True)
class ThresholdBudget:
    """NAMM's own rule: keep tokens scoring >= the config's threshold (plus its optional `max_tokens` cap).

    Only meaningful for policies whose scores have a calibrated zero (NAMM scorers)."""

    def tokens_for(self, real_tokens_seen: int) -> None:
        return None

    def describe(self) -> str:
        return "score threshold"


Budget = Union[TokenBudget, FractionBudget, ThresholdBudget]


def parse_budget(budget: object) -> Budget | None:
    """Turn what users write into a budget.

    `None` -> None (the policy's default); an int -> `TokenBudget`; a float in (0, 1] or a string like
    `"25%"` -> `FractionBudget`; `"threshold"` -> `ThresholdBudget`; a budget object -> itself.
    """
    if budget is None or isinstance(budget, (TokenBudget, FractionBudget, ThresholdBudget)):
        return budget
    if isinstance(budget, bool):
        raise ValueError(f"Not a budget: {budget!r}.")
    if isinstance(budget, int):
        return TokenBudget(budget)
    if isinstance(budget, float):
        if budget > 1.0 and budget.is_integer():
            return TokenBudget(int(budget))
        return FractionBudget(budget)
    if isinstance(budget, str):
        text = budget.strip().lower()
        if text == "threshold":
            return ThresholdBudget()
        try:
            if text.endswith("%"):
                return FractionBudget(float(text[:-1]) / 100.0)
            number = float(text)
        except ValueError:
            raise ValueError(
                f"Cannot read budget {budget!r}: use a token count (512), a fraction (0.25 or '25%') or 'threshold'."
            ) from None
        return parse_budget(int(number) if number.is_integer() and number > 1 else number)
    raise ValueError(f"Cannot read budget {budget!r}: use a token count (512), a fraction (0.25 or '25%') or 'threshold'.")
