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


def scorer_folder_without_model(folder, config, monkeypatch) -> str:
    """Save `random_scorer(3)` with `config` to `folder` and make loading a model fail the test: for CLIs that must
    refuse bad flags before they load a model. Returns the folder as a string."""
    from namm_cache.evolution import run
    from namm_cache.hub import ScorerMetadata, save_scorer

    def load_model(name):
        raise AssertionError("the flags should have been refused before the model loads")

    monkeypatch.setattr(run, "load_model", load_model)
    save_scorer(folder, random_scorer(seed=3), config, ScorerMetadata(description="test scorer"))
    return str(folder)
