"""The one contract every eviction policy follows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import NAMMConfig


@dataclass
class Observation:
    """What a policy sees of one layer when it scores, one row per (batch row, KV head) being scored.

    Attributes:
        layer_idx: the model layer.
        keys: `(N, S, head_dim)` cached (post-RoPE) keys.
        positions: `(N, S)` absolute positions of the cached tokens.
        valid: `(N, S)` bool, False for empty storage slots and padding tokens.
        age: `(N, S)` newest position minus each token's position.
        spectrogram: `(N, S, n_bins)` EMA of each token's attention spectrogram (not normalised).
        config: the cache's `NAMMConfig`.
    """

    layer_idx: int
    keys: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    age: torch.Tensor
    spectrogram: torch.Tensor
    config: NAMMConfig


class Policy:
    """An eviction policy: `score(observation) -> (N, S)` float scores, higher = keep.

    The cache keeps tokens whose score is >= the config's threshold, at most `max_tokens` of them
    (highest first), and always the newest token.
    """

    name: str = "policy"

    def constant_score(self) -> float | None:
        """If every token would get the same score whatever the observation, that score; else None.

        A layer whose policy scores constantly does not need attention probabilities, so it runs the
        model's fast attention (sdpa) without observing.
        """
        return None

    def score(self, observation: Observation) -> torch.Tensor:
        raise NotImplementedError
