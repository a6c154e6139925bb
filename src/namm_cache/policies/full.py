"""Full cache: never evicts (the reference every budget is compared with)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budgets import Budget, ThresholdBudget
from .base import Observation, Policy


@dataclass(frozen=True)
class FullCachePolicy(Policy):
    """Rule: every token scores 0 under a threshold of 0, so nothing is ever evicted. Refuses budgets."""

    name = "full"
    supports_threshold = True

    def constant_score(self) -> float | None:
        return 0.0

    @classmethod
    def check_budget(cls, budget: Budget | None) -> Budget:
        if budget is not None and not isinstance(budget, ThresholdBudget):
            raise ValueError("The 'full' policy keeps every token; it takes no budget (drop budget=...).")
        return ThresholdBudget()

    def score(self, observation: Observation) -> torch.Tensor:
        return torch.zeros(observation.valid.shape, device=observation.keys.device)
