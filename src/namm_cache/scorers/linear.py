"""Linear scorer: one weight per input, nothing between the features and the score."""

from __future__ import annotations

import torch

from ..features import POOLED_INPUTS
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


class LinearPooledScorer(LinearScorer):
    """`LinearScorer` that also reads each token's pooled key norm: the mean over the KV heads of the layers
    up to the scoring one of their z-scored log key norms (`namm_cache.ledger`), standardised over the
    tokens a row holds. 28 inputs and 29 parameters at the paper's sizes.

    One head's key norm flags a needle weakly (AUC 0.72 on SmolLM2, averaged over heads); pooled over all
    layers it flags it far better (0.92, `benchmarks/needle_features.py`), and the cache computes it before
    any query has looked at the token. Zero-initialised like `LinearScorer`."""

    kind = "linear_pooled"
    extra_inputs = POOLED_INPUTS

    def __init__(self, input_dim: int = 28, n_bins: int = 17):
        super().__init__(input_dim=input_dim, n_bins=n_bins)
