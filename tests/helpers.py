"""Scorers with known behaviour, for tests."""

from __future__ import annotations

import torch

from namm_cache import BAMScorer


def observing_keep_all_scorer() -> BAMScorer:
    """Scores depend on the features (so attention is observed) but are always far above 0 (keep all)."""
    scorer = BAMScorer()
    with torch.no_grad():
        scorer.readout.weight.fill_(1e-3)
        scorer.readout.bias.fill_(1e3)
    return scorer


def random_scorer(seed: int = 0, scale: float = 0.3) -> BAMScorer:
    """A BAM scorer with random parameters: evicts a data-dependent subset, different per head."""
    scorer = BAMScorer()
    generator = torch.Generator().manual_seed(seed)
    scorer.set_flat_params(torch.randn(scorer.num_parameters(), generator=generator) * scale)
    return scorer
