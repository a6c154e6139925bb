"""Oracle: told which tokens the answer needs, it keeps them; the ceiling line of the benchmarks, not a baseline."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..validation import check_int
from .base import Observation, Policy, rank_by_position

TIER = 1.0e6  # above any recency (-tokens) of a context below a million tokens


@dataclass(frozen=True)
class OraclePolicy(Policy):
    """A ceiling: it knows the token `positions` that matter for one prompt (e.g. the needle sentence,
    `Example.evidence_positions`) and ranks them first, then the first `sinks` real tokens, then the rest by
    recency. Within a budget of k tokens it thus keeps the evidence, the sinks and the k - |evidence| - sinks
    most recent tokens (StreamingLLM plus the evidence). No eviction policy can know the positions in advance;
    the gap between this line and a method is how much finding the evidence is worth.

    `positions` are absolute positions in the sequence the cache sees (the index of each token in the
    prompt's ids; with left padding, in the padded row), shared by every batch row. Needs no attention.
    """

    positions: tuple[int, ...]
    sinks: int = 4
    name = "oracle"

    def __post_init__(self) -> None:
        positions = self.positions
        if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
            raise ValueError(f"positions must be a list of token positions (integers >= 0), got {positions!r}.")
        positions = list(positions)
        if not positions:
            raise ValueError("positions must name at least one token position (the oracle's evidence); got none.")
        bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 0]
        if bad:
            raise ValueError(f"positions must be integers >= 0, got {bad[0]!r} among them.")
        self._set(positions=tuple(sorted({int(p) for p in positions})),
                  sinks=check_int("sinks", self.sinks, minimum=0, maximum=2**40))
        super().__post_init__()

    def settings(self):
        # A prompt's evidence can be hundreds of positions: report their count and range, not every one.
        return {"positions": f"{len(self.positions)} tokens in [{self.positions[0]}, {self.positions[-1]}]", "sinks": self.sinks}

    def score(self, observation: Observation) -> torch.Tensor:
        """`(N, S)`: evidence 2e6 + recency, sinks 1e6 + recency, others their recency (newest 0, older < 0).
        Tiers far below PROTECTED keep recency exact in float32 inside a tier (up to a million tokens)."""
        positions = observation.positions
        evidence = torch.isin(positions, torch.tensor(self.positions, dtype=positions.dtype, device=positions.device))
        oldest_rank = rank_by_position(positions, observation.valid, newest_first=False)
        recency = positions.to(torch.float32) - positions.max()
        return recency + (oldest_rank < self.sinks) * TIER + evidence * (2 * TIER)
