"""NAMM scorers: small networks, shared across layers and heads, that turn token features into scores."""

from __future__ import annotations

import torch

from .bam import BAMNormsScorer, BAMScorer
from .base import Scorer
from .linear import LinearAllLayersScorer, LinearPooledScorer, LinearScorer
from .mlp import MLPScorer

SCORER_KINDS: dict[str, type[Scorer]] = {"bam": BAMScorer, "bam_norms": BAMNormsScorer, "mlp": MLPScorer, "linear": LinearScorer,
                                     "linear_pooled": LinearPooledScorer, "linear_all_layers": LinearAllLayersScorer}


def build_scorer(kind: str, **kwargs) -> Scorer:
    """Build a scorer from its `config_dict()` (kind plus constructor arguments)."""
    if kind not in SCORER_KINDS:
        raise ValueError(f"Unknown scorer kind {kind!r}; known kinds: {sorted(SCORER_KINDS)}.")
    return SCORER_KINDS[kind](**kwargs)


def attention_mass_scorer(input_dim: int = 25, n_bins: int = 17, weight: float = 1.0, bias: float = 0.0) -> MLPScorer:
    """A hand-set scorer: `score = weight * z(bin 0) + bias`, where bin 0 of the spectrogram is the
    EMA of the attention mass a token received. It keeps tokens that receive more attention than the
    calibration average (heavy hitters), and is a sensible default before an evolved scorer exists."""
    scorer = MLPScorer(input_dim=input_dim, n_bins=n_bins)
    recency_dim = input_dim - n_bins
    with torch.no_grad():
        scorer.readout.weight[0, recency_dim] = weight
        scorer.readout.bias[0] = bias
    return scorer


def keep_all_observing_scorer(input_dim: int = 25, n_bins: int = 17) -> BAMScorer:
    """A BAM scorer whose scores depend on the features (so the cache observes attention and runs the
    whole feature pipeline) but always exceed 0 by far: nothing is evicted. For measuring the pipeline's
    cost and checking it leaves outputs unchanged."""
    scorer = BAMScorer(input_dim=input_dim, n_bins=n_bins)
    with torch.no_grad():
        scorer.readout.weight.fill_(1e-3)
        scorer.readout.bias.fill_(1e3)
    return scorer


__all__ = ["keep_all_observing_scorer", "Scorer", "BAMScorer", "BAMNormsScorer", "MLPScorer", "LinearScorer", "LinearPooledScorer", "LinearAllLayersScorer", "SCORER_KINDS", "build_scorer", "attention_mass_scorer"]
