"""Linear scorer: one weight per input, nothing between the features and the score."""

from __future__ import annotations

import torch

from ..features import ALL_LAYER_INPUTS, POOLED_INPUTS
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

    def inputs_read(self) -> tuple[list[str], list[str]]:
        weights = self.readout.weight.detach()[0]
        read, ignored, start = [], [], 0
        for name, size in self.input_groups().items():
            (read if bool(weights[start:start + size].any()) else ignored).append(name)
            start += size
        return read, ignored


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


class LinearAllLayersScorer(LinearScorer):
    """`LinearScorer` that also reads each token's key norm pooled over **every** layer
    (`namm_cache.ledger.KeyNormLedger.pooled_all_layers`): each (layer, KV head) row's z-scored log key norm,
    averaged over the rows that have seen the token, standardised over the tokens a row holds. 28 inputs and
    29 parameters at the paper's sizes.

    `LinearPooledScorer` reads layers `0..l` only, so that a round inside a chunk needs nothing the forward pass
    has not computed yet; its input ranks variable-tracking statements among the haystack at AUC 0.67 on SmolLM2
    at 2,400 tokens, every layer's at 0.89 (`benchmarks/needle_features.py`). A round whose point ends a chunk
    runs when the next chunk reaches the layer, when every layer has seen every token it scores: so with
    prefill chunks of `update_interval` tokens (as the evolution and the benchmarks feed prompts) and in
    decoding, every round reads every layer. A round inside a chunk (a longer prefill chunk) reads every layer
    for the tokens before that chunk and layers `0..l` for the chunk's own.
    Zero-initialised like `LinearScorer`."""

    kind = "linear_all_layers"
    extra_inputs = ALL_LAYER_INPUTS

    def __init__(self, input_dim: int = 28, n_bins: int = 17):
        super().__init__(input_dim=input_dim, n_bins=n_bins)
