"""NAMM: scores from an evolved scorer reading attention spectrograms and token age."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..features import log_norms, reads_ledger, token_features, with_extra_inputs
from ..scorers import Scorer
from .base import Observation, Policy


@dataclass(frozen=True)
class NAMMPolicy(Policy):
    """Sakana AI, "An Evolved Universal Transformer Memory" (Cetin et al., 2024).

    Rule: features = [sinusoidal age embedding, z-normalised EMA of the attention spectrogram]; the shared
    scorer (BAM or MLP) maps them to scores; under the default threshold budget tokens scoring >= 0 are
    kept. Under a token or fraction budget the highest-scoring tokens are kept instead.
    """

    scorer: Scorer = field(repr=False)
    name = "namm"
    needs = frozenset({"spectrogram"})
    supports_threshold = True

    def __post_init__(self) -> None:
        if not isinstance(self.scorer, Scorer):
            raise ValueError(
                f"The namm policy needs a Scorer (BAMScorer(), MLPScorer(), or one loaded with NAMMCache.from_pretrained), "
                f"got {type(self.scorer).__name__}: {self.scorer!r:.60}."
            )
        super().__post_init__()

    def __repr__(self) -> str:
        return f"NAMMPolicy(scorer={type(self.scorer).__name__}, {self.scorer.num_parameters()} parameters)"

    @property
    def reads_pooled_key_norm(self) -> bool:  # type: ignore[override]
        return reads_ledger(self.scorer.extra_inputs)

    @property
    def pools_every_layer(self) -> bool:  # type: ignore[override]
        return "all_layer_key_norm" in self.scorer.extra_inputs

    def constant_score(self) -> float | None:
        return self.scorer.constant_score()

    def score(self, observation: Observation) -> torch.Tensor:
        constant = self.constant_score()
        if constant is not None:
            return torch.full(observation.valid.shape, constant, device=observation.keys.device)
        features = token_features(
            observation.statistics["spectrogram"],
            observation.age,
            self.scorer.spectrogram_mean,
            self.scorer.spectrogram_std,
            observation.config,
        )
        norms = log_norms(observation.keys, observation.values) if self.scorer.extra_inputs else None
        features = with_extra_inputs(self.scorer.extra_inputs, features, norms, observation.valid, observation.pooled_key_norm)
        parameter = next(self.scorer.parameters(), None)
        if parameter is not None:
            features = features.to(parameter.device)
        with torch.no_grad():
            scores = self.scorer(features, observation.positions.to(features.device), observation.valid.to(features.device))
        return scores.to(observation.keys.device)
