"""Key-norm (L2): keep the tokens whose keys have the lowest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Observation, Policy


@dataclass(frozen=True)
class KeyNormPolicy(Policy):
    """Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (EMNLP 2024).

    Rule: score = -||key||_2 of the cached (post-RoPE) key; the k lowest-norm keys are kept. Needs no
    attention, so the model runs its fast attention kernel.
    """

    name = "key_norm"

    def score(self, observation: Observation) -> torch.Tensor:
        return -observation.keys.to(torch.float32).norm(dim=-1)
