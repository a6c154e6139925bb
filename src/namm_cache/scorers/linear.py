"""Linear scorer: one weight per input, nothing between the features and the score."""

from __future__ import annotations

import torch

from .base import Scorer, zero_linear


class LinearScorer(Scorer):
    """`score = w . x + b` over each token's own inputs: the paper's features (age embedding, spectrogram)
    then its key and value norms (`namm_cache.features.norm_features`), 27 inputs and 28 parameters at the
    paper's sizes. Costs O(S) per row (BAM attends over the row's tokens: O(S^2)).

    Its few parameters suit full-covariance CMA-ES at small populations, where BAM's 4,172 need a diagonal
    one; with `NAMMConfig.sinks` / `recent_window` it decides what to keep beyond sinks and local context.
    Zero-initialised: every score is 0 (keep everything under the default threshold)."""

    kind = "linear"
    extra_inputs = ("key_norm", "value_norm")

    def __init__(self, input_dim: int = 27, n_bins: int = 17):
        super().__init__(input_dim=input_dim, n_bins=n_bins)
        self.readout = zero_linear(self.input_dim, 1)

    def score_tokens(self, features: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.readout(features.to(self.readout.weight.dtype)).squeeze(-1)
