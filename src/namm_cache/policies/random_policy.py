"""Random eviction, seeded: the floor every method should beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_int
from .base import Observation, Policy

_MASK = (1 << 62) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A few rounds of multiply / xor-shift on int64 (wrapping), kept non-negative."""
    for multiplier in (0x5BD1E995, 0x27D4EB2F, 0x165667B1):
        x = (x * multiplier) & _MASK
        x = x ^ (x >> 29)
    return x


@dataclass(frozen=True)
class RandomPolicy(Policy):
    """Rule: each token gets a uniform pseudo-random score that depends only on (seed, layer, KV head, the
    row's eviction round, token age), so a run is reproducible and a batch row evicts exactly what
    the same prompt would alone; the top tokens within the budget are kept."""

    seed: int = 0
    name = "random"

    def __post_init__(self) -> None:
        self._set(seed=check_int("seed", self.seed, minimum=0, maximum=2**32 - 1))
        super().__post_init__()

    def score(self, observation: Observation) -> torch.Tensor:
        n = observation.valid.shape[0]
        device = observation.positions.device
        rounds = observation.eviction_round if observation.eviction_round is not None else torch.zeros(n, dtype=torch.long)
        heads = observation.head_index if observation.head_index is not None else torch.zeros(n, dtype=torch.long)
        key = _mix(torch.full((n, 1), self.seed * 1_000_003 + observation.layer_idx, dtype=torch.long, device=device))
        key = _mix(key + rounds.to(device).view(n, 1) * 7_919 + heads.to(device).view(n, 1) * 104_729)
        bits = _mix(key + observation.age.to(torch.long) * 2_654_435_761)
        return (bits >> 38).to(torch.float32) / float(1 << 24)
