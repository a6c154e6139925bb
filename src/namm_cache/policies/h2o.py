"""H2O: heavy hitters (accumulated attention) plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_float
from .base import PROTECTED, Observation, Policy, rank_by_position


@dataclass(frozen=True)
class H2OPolicy(Policy):
    """Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs" (NeurIPS 2023).

    Rule: with a budget of k tokens, keep the `round(recent_ratio * k)` most recent tokens and fill the
    rest with the tokens that received the most attention, summed over every query since they arrived
    (per KV head: the mean over the query heads of its group).
    """

    recent_ratio: float = 0.5
    name = "h2o"
    needs = frozenset({"attention_sum"})

    def __post_init__(self) -> None:
        self._set(recent_ratio=check_float("recent_ratio", self.recent_ratio, minimum=0, maximum=1))
        super().__post_init__()

    def score(self, observation: Observation) -> torch.Tensor:
        recent = torch.round(observation.budget.to(torch.float32) * self.recent_ratio).to(torch.long)
        rank = rank_by_position(observation.positions, observation.valid, newest_first=True)
        protected = rank < recent.unsqueeze(-1)
        return observation.statistics["attention_sum"] + protected * PROTECTED
