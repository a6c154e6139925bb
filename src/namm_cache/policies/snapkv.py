"""SnapKV: attention of an observation window of recent queries, pooled over neighbouring tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..validation import check_int
from .base import PROTECTED, Observation, Policy, rank_by_position


@dataclass(frozen=True)
class SnapKVPolicy(Policy):
    """Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2024).

    Rule: sum the attention each token receives from the last `window` queries before the eviction
    point (the observation window), smooth it with a 1-D average pool of width `kernel_size` over the
    tokens in chronological order, keep the top tokens within the budget, and always keep the tokens of
    the observation window itself. Here it runs at every eviction round, not only after the prompt.
    """

    window: int = 32
    kernel_size: int = 7
    name = "snapkv"
    needs = frozenset({"window_attention"})

    def __post_init__(self) -> None:
        window = check_int("window", self.window, minimum=1, maximum=2**20)
        kernel_size = check_int("kernel_size", self.kernel_size, minimum=1, maximum=2**10 + 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the pooling is centred on each token), got {kernel_size}.")
        self._set(window=window, kernel_size=kernel_size)
        super().__post_init__()

    def score(self, observation: Observation) -> torch.Tensor:
        valid, positions = observation.valid, observation.positions
        # Pool over the chronological sequence of real tokens: pack them to the front in order first.
        big = torch.iinfo(positions.dtype).max
        order = torch.where(valid, positions, torch.full_like(positions, big)).argsort(dim=-1, stable=True)
        packed = observation.statistics["window_attention"].gather(-1, order) * valid.gather(-1, order)
        pad = self.kernel_size // 2
        pooled = F.avg_pool1d(packed.unsqueeze(1), self.kernel_size, stride=1, padding=pad, count_include_pad=False).squeeze(1)
        scores = torch.empty_like(pooled).scatter_(-1, order, pooled)
        in_window = rank_by_position(positions, valid, newest_first=True) < self.window
        return scores + in_window * PROTECTED
