"""Normalisation statistics of the spectrogram features, computed once with a keep-all policy.

The paper z-normalises the 17 spectrogram bins with statistics gathered while nothing is evicted, then
freezes them and ships them with the scorer weights. `calibrate_normalization` does that: it runs the
model over calibration sequences with a policy that observes attention but keeps every token, and
collects the EMA spectrogram of every token at every eviction round.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .cache import NAMMCache
from .config import NAMMConfig
from .features import RunningMoments
from .policies import Observation, Policy
from .scorers import Scorer


class KeepAllObservingPolicy(Policy):
    """Scores every token 0 (kept at threshold 0) but declares that it needs observations."""

    name = "keep-all-observing"
    needs = frozenset({"spectrogram"})
    supports_threshold = True

    def score(self, observation: Observation) -> torch.Tensor:
        return torch.zeros(observation.valid.shape, device=observation.keys.device)


@torch.no_grad()
def calibrate_normalization(
    model: nn.Module,
    sequences: Iterable[torch.Tensor],
    *,
    config: NAMMConfig | None = None,
    chunk_size: int | None = None,
    scorer: Scorer | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute per-bin mean and std of the EMA spectrogram features with nothing evicted.

    Args:
        model: the model the scorer will serve.
        sequences: token id tensors `(1, T)` or `(T,)`, each longer than `update_interval`.
        config: feature settings (defaults: the paper's).
        chunk_size: prefill chunk size (default: `update_interval`).
        scorer: if given, the statistics are stored in it (`scorer.set_normalization`).

    Returns:
        `(mean, std)`, each `(n_bins,)` float32.
    """
    config = config or NAMMConfig()
    config = config.replace(max_tokens=None, threshold=0.0)
    chunk_size = chunk_size or config.update_interval
    moments = RunningMoments(config.n_bins)
    cache = NAMMCache(model=model, config=config, policy=KeepAllObservingPolicy())
    cache.feature_observer = lambda layer_idx, spectrogram: moments.update(spectrogram)
    for ids in tqdm(list(sequences), desc="calibrating", disable=not progress):
        ids = ids.view(1, -1) if ids.dim() == 1 else ids
        cache.reset()
        for chunk in ids.split(chunk_size, dim=1):
            model(input_ids=chunk.to(model.device), cache=cache, use_cache=True)
        # One more token triggers the eviction round that covers the last chunk.
        model(input_ids=ids[:, -1:].to(model.device), cache=cache, use_cache=True)
    if moments.count < 2:
        raise ValueError(
            f"Calibration saw {moments.count} token features; give sequences longer than update_interval "
            f"({config.update_interval}) tokens."
        )
    mean, std = moments.mean.to(torch.float32), moments.std.to(torch.float32).clamp_min(1e-8)
    if scorer is not None:
        scorer.set_normalization(mean, std)
    return mean, std
