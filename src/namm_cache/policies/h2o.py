"""H2O: heavy hitters (accumulated attention) plus a recent window."""

from __future__ import annotations

import torch

from ..validation import check_float
from .base import ATTENTION_SUM, PROTECTED, Observation, Policy, rank_by_position


class H2OPolicy(Policy):
    """Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs" (NeurIPS 2023).

    Rule: with a budget of k tokens, keep the `round(recent_ratio * k)` most recent tokens and fill the
    rest with the tokens that received the most attention, summed over every query since they arrived
    (per KV head: the mean over the query heads of its group).
    """

    name = "h2o"
    needs = frozenset({ATTENTION_SUM})

    def __init__(self, recent_ratio: float = 0.5):
        self.recent_ratio = check_float("recent_ratio", recent_ratio, minimum=0, maximum=1)

    def score(self, observation: Observation) -> torch.Tensor:
        recent = torch.round(observation.budget.to(torch.float32) * self.recent_ratio).to(torch.long)
        rank = rank_by_position(observation.positions, observation.valid, newest_first=True)
        protected = rank < recent.unsqueeze(-1)
        return observation.attention_sum + protected * PROTECTED
