"""The one configuration dataclass of a NAMM: feature constants and eviction settings.

Every default is the value of the paper's released configuration (Sakana AI, "An Evolved Universal
Transformer Memory"), so `NAMMConfig()` reproduces the paper's pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Field -> True for integers, False for any real number; the optional fields may also be None.
FIELD_KINDS = {"n_fft": True, "hop_length": True, "recency_dim": True, "update_interval": True, "max_tokens": True,
               "ema_gamma": False, "recency_max_frequency": False, "threshold": False}
OPTIONAL_FIELDS = ("max_tokens", "threshold")


@dataclass
class NAMMConfig:
    """Constants of the feature pipeline and of eviction.

    Attributes:
        n_fft: STFT window length in queries (paper: 32).
        hop_length: STFT hop in queries (paper: 16). Also the length of the tail of attention values each
            token carries across updates, so that frames straddling two updates are computed exactly.
        ema_gamma: per-query decay of the exponential moving average over spectrogram frames (paper: 0.99).
            One frame advances `hop_length` queries, so a frame decays by `ema_gamma ** hop_length`.
        recency_dim: size of the sinusoidal embedding of a token's age (paper: 8). Must be even.
        recency_max_frequency: base of the sinusoidal age embedding (paper: 50000).
        update_interval: scoring and eviction happen once every this many tokens seen (paper: 512). Must
            be a multiple of `hop_length`.
        threshold: tokens whose score is below this are evicted (paper: 0).
        max_tokens: optional hard cap on the tokens each (batch row, KV head) keeps per layer; when more
            tokens pass the threshold, the highest-scoring ones are kept.
    """

    n_fft: int = 32
    hop_length: int = 16
    ema_gamma: float = 0.99
    recency_dim: int = 8
    recency_max_frequency: float = 50000.0
    update_interval: int = 512
    threshold: float = 0.0
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_bins(self) -> int:
        """Number of one-sided STFT frequency bins: `n_fft // 2 + 1`."""
        return self.n_fft // 2 + 1

    @property
    def feature_dim(self) -> int:
        """Size of a token's feature vector: recency embedding + spectrogram bins."""
        return self.recency_dim + self.n_bins

    @property
    def frame_decay(self) -> float:
        """EMA decay applied per spectrogram frame: `ema_gamma ** hop_length`."""
        return self.ema_gamma**self.hop_length

    def validate(self) -> None:
        """Raise `ValueError` naming the fix if the settings cannot work together."""
        for name, integer in FIELD_KINDS.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                kind = "an integer" if integer else "a number"
                raise ValueError(f"{name} must be {kind}{' or None' if name in OPTIONAL_FIELDS else ''}, got {value!r}.")
        if self.n_fft <= 0 or self.hop_length <= 0:
            raise ValueError(f"n_fft ({self.n_fft}) and hop_length ({self.hop_length}) must be positive.")
        if self.n_fft != 2 * self.hop_length:
            raise ValueError(
                f"n_fft ({self.n_fft}) must be twice hop_length ({self.hop_length}): each token carries a tail of "
                "hop_length attention values, which is exactly the overlap of two frames."
            )
        if not 0.0 < self.ema_gamma <= 1.0:
            raise ValueError(f"ema_gamma must be in (0, 1], got {self.ema_gamma}.")
        if self.recency_dim < 0 or self.recency_dim % 2:
            raise ValueError(f"recency_dim must be a non-negative even number, got {self.recency_dim}.")
        if self.update_interval <= 0 or self.update_interval % self.hop_length:
            raise ValueError(
                f"update_interval ({self.update_interval}) must be a positive multiple of hop_length "
                f"({self.hop_length}); try update_interval={max(1, round(self.update_interval / self.hop_length)) * self.hop_length}."
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be None or >= 1, got {self.max_tokens}.")

    def replace(self, **changes: Any) -> "NAMMConfig":
        """Return a copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"Unknown NAMMConfig field(s): {sorted(unknown)}.")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NAMMConfig":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown NAMMConfig field(s): {sorted(unknown)}.")
        return cls(**data)
