"""TOVA: keep the tokens the newest query attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Observation, Policy


@dataclass(frozen=True)
class TOVAPolicy(Policy):
    """Oren et al., "Transformers are Multi-State RNNs" (TOVA, 2024).

    Rule: score = attention the newest query gives each token (per KV head: the mean over the query heads
    of its group; the paper averages over all heads of the layer); the top tokens within the budget are
    kept.
    """

    name = "tova"
    needs = frozenset({"last_attention"})

    def score(self, observation: Observation) -> torch.Tensor:
        return observation.statistics["last_attention"].clone()
