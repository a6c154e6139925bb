"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_int
from .base import PROTECTED, Observation, Policy, rank_by_position


@dataclass(frozen=True)
class StreamingLLMPolicy(Policy):
    """Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024).

    Rule: keep the first `sinks` real tokens of the sequence and, within the budget k, the `k - sinks`
    most recent tokens. Needs no attention.
    """

    sinks: int = 4
    name = "streaming_llm"

    def __post_init__(self) -> None:
        self._set(sinks=check_int("sinks", self.sinks, minimum=0, maximum=2**40))
        super().__post_init__()

    def score(self, observation: Observation) -> torch.Tensor:
        oldest_rank = rank_by_position(observation.positions, observation.valid, newest_first=False)
        recency = observation.positions.to(torch.float32) - observation.positions.max()  # newest = 0, older < 0
        return recency + (oldest_rank < self.sinks) * PROTECTED
