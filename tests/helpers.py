"""Scorers with known behaviour, for tests."""

from __future__ import annotations

import torch

from namm_cache import BAMScorer


from namm_cache.scorers import keep_all_observing_scorer as observing_keep_all_scorer  # noqa: F401


def random_scorer(seed: int = 0, scale: float = 0.3) -> BAMScorer:
    """A BAM scorer with random parameters: evicts a data-dependent subset, different per head."""
    scorer = BAMScorer()
    generator = torch.Generator().manual_seed(seed)
    scorer.set_flat_params(torch.randn(scorer.num_parameters(), generator=generator) * scale)
    return scorer
