"""How many tokens a policy may keep: a fixed count, a fraction of tokens seen, or NAMM's threshold."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

import numpy as np

from .config import MAX_TOKEN_COUNT
from .validation import check_float, check_int


@dataclass(frozen=True)
class TokenBudget:
    """Keep at most `tokens` tokens per (batch row, KV head) of each layer after every eviction round."""

    tokens: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", check_int("A token budget", self.tokens, minimum=1, maximum=MAX_TOKEN_COUNT))

    def tokens_for(self, real_tokens_seen: int) -> int:
        return self.tokens

    def describe(self) -> str:
        return f"{self.tokens} tokens"


@dataclass(frozen=True)
class FractionBudget:
    """Keep at most `ceil(fraction * tokens seen)` tokens per (batch row, KV head) of each layer."""

    fraction: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "fraction", check_float("A fraction budget", self.fraction, above=0, maximum=1))

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


HOW_TO_WRITE = "use a token count (512), a fraction (0.25 or '25%') or 'threshold'"
AMBIGUOUS_ONE = (
    "budget {value!r} is ambiguous: 1 could mean one token or 100% of tokens. Write '100%' (or 1.0) to keep every "
    "token, a token count of 2 or more, or TokenBudget(1) if you really mean a single token."
)


def parse_budget(budget: object) -> Budget | None:
    """Turn what users write into a budget. The written form decides the kind:

    - `None` -> None (the policy's default); a budget object -> itself; `"threshold"` -> `ThresholdBudget`.
    - An integer (Python or numpy), or a string of digits (`"512"`) -> `TokenBudget`.
    - A float in (0, 1] (Python or numpy), a decimal string (`"0.25"`, `"1.0"`) or a percentage (`"25%"`)
      -> `FractionBudget`. A whole float above 1 (`1e3` from YAML or lm-eval) is a token count.
    - `1` and `"1"` are refused: one token and 100% are both plausible readings, and lm-eval turns the text
      `budget=1` into the integer 1 before we see it, so the same text must mean the same thing everywhere.

    Anything else (bools, NaN, inf, zero or negative numbers, other strings) raises `ValueError`.
    """
    if budget is None or isinstance(budget, (TokenBudget, FractionBudget, ThresholdBudget)):
        return budget
    if isinstance(budget, (bool, np.bool_)):
        raise ValueError(f"Not a budget: {budget!r}; {HOW_TO_WRITE}.")
    if isinstance(budget, numbers.Integral):
        if int(budget) == 1:
            raise ValueError(AMBIGUOUS_ONE.format(value=budget))
        return TokenBudget(int(budget))
    if isinstance(budget, numbers.Real):
        number = float(budget)
        if math.isfinite(number) and number > 1.0 and number.is_integer():
            return TokenBudget(int(number))
        if math.isfinite(number) and number > 1.0:
            raise ValueError(f"budget {budget!r} is neither a fraction in (0, 1] nor a whole token count; {HOW_TO_WRITE}.")
        return FractionBudget(number)
    if isinstance(budget, str):
        text = budget.strip().lower()
        if text == "threshold":
            return ThresholdBudget()
        if re.fullmatch(r"[+-]?\d+", text):
            return parse_budget(int(text))
        try:
            number = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"Cannot read budget {budget!r}: {HOW_TO_WRITE}.") from None
        return FractionBudget(number) if text.endswith("%") else parse_budget(number)
    raise ValueError(f"Cannot read budget {budget!r}: {HOW_TO_WRITE}.")


def refuse_ignored_settings(budget: Budget | None, overrides: Mapping[str, Any], full: bool = False) -> None:
    """`ValueError` for settings given by name that a cache would silently ignore: `threshold` or `min_fraction`
    with a token or fraction budget (the budget alone then decides what is kept), and `threshold`,
    `min_fraction` or `max_tokens` for the full policy (`full`: it keeps every token). Only what the caller
    passes is checked: settings stored in a scorer's or a run's `NAMMConfig` are not errors under a budget
    that was asked for (the budget decides, as documented)."""
    given = [name for name in ("threshold", "min_fraction") if overrides.get(name) is not None]
    if given and budget is not None and not isinstance(budget, ThresholdBudget):
        raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to the scorer's threshold, "
                         f"but the budget ({budget.describe()}) decides alone what is kept and would ignore "
                         f"{'them' if len(given) > 1 else 'it'}; drop {' and '.join(f'{name}=' for name in given)} or the budget.")
    given = [name for name in ("threshold", "min_fraction", "max_tokens") if overrides.get(name) is not None]
    if given and full:
        raise ValueError(f"The 'full' policy keeps every token, so {' and '.join(f'{name}=' for name in given)} would be "
                         "ignored; drop it, or use a scorer or another policy.")
