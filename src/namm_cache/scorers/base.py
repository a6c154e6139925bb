"""Common machinery of NAMM scorers: normalisation statistics and the flat parameter view."""

from __future__ import annotations

import torch
from torch import nn

from ..validation import check_int

# Ceilings for scorer sizes: the paper uses 25 features and hidden 32; these are far above any sensible
# setting and keep a typo (hidden_dim 20000000) from asking for gigabytes.
MAX_INPUT_DIM = 8192
MAX_HIDDEN_DIM = 4096


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """An `nn.Linear` whose weight and bias are zeros, built without drawing from the global torch RNG.

    `nn.Linear` normally runs a random initialisation that advances `torch`'s global generator, so merely
    creating a cache would change what `torch.randn` returns next. Building on the meta device skips that
    initialisation; the parameters are then materialised on the default device and zeroed.
    """
    layer = nn.Linear(in_features, out_features, device="meta").to_empty(device=torch.get_default_device())
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    return layer


def check_hidden_dim(hidden_dim: object) -> int:
    """`hidden_dim` as an int in [1, MAX_HIDDEN_DIM], else `ValueError`."""
    return check_int("hidden_dim", hidden_dim, minimum=1, maximum=MAX_HIDDEN_DIM)


class Scorer(nn.Module):
    """A network that maps per-token features to eviction scores (higher = keep; keep if >= threshold).

    Subclasses implement `score_tokens`. One scorer is shared by every layer and KV head of a model.

    Buffers:
        spectrogram_mean, spectrogram_std: `(n_bins,)` statistics the spectrogram part of the features
            is z-normalised with (identity until calibrated, see `namm_cache.calibration`).
    """

    kind: str = "base"
    # Per-token inputs read after the age embedding and the spectrogram, in this order (e.g. the key and
    # value norms: `namm_cache.features.norm_features`); a scorer's input_dim is the config's feature_dim
    # plus their count (`input_dim_for`).
    extra_inputs: tuple[str, ...] = ()

    @classmethod
    def input_dim_for(cls, config) -> int:
        """The `input_dim` this kind of scorer has under a `NAMMConfig`: its features plus the extra inputs."""
        return config.feature_dim + len(cls.extra_inputs)

    def __init__(self, input_dim: int, n_bins: int):
        super().__init__()
        input_dim = check_int("input_dim", input_dim, minimum=1, maximum=MAX_INPUT_DIM)
        n_bins = check_int("n_bins", n_bins, minimum=1, maximum=MAX_INPUT_DIM)
        if input_dim < n_bins:
            raise ValueError(f"input_dim ({input_dim}) must be at least n_bins ({n_bins}) > 0.")
        self.input_dim = input_dim
        self.n_bins = n_bins
        self.register_buffer("spectrogram_mean", torch.zeros(n_bins))
        self.register_buffer("spectrogram_std", torch.ones(n_bins))

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store calibrated per-bin statistics (shape `(n_bins,)` each, std > 0)."""
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != (self.n_bins,) or std.shape != (self.n_bins,):
            raise ValueError(f"Normalisation statistics must have shape ({self.n_bins},), got {tuple(mean.shape)}, {tuple(std.shape)}.")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("Normalisation statistics must be finite with std > 0.")
        self.spectrogram_mean.copy_(mean)
        self.spectrogram_std.copy_(std)

    def score_tokens(self, features: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Score tokens.

        Args:
            features: `(N, S, input_dim)` per-token features (one row per (batch, KV head) of one layer).
            positions: `(N, S)` absolute positions, used to know which tokens are newer.
            valid: `(N, S)` bool, False for storage slots that hold no token (their scores are ignored).

        Returns:
            `(N, S)` float scores.
        """
        raise NotImplementedError

    def forward(self, features: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.input_dim:
            raise ValueError(
                f"{type(self).__name__} reads {self.input_dim} features per token but got {features.shape[-1]}; "
                "build the scorer with input_dim=config.feature_dim of the NAMMConfig you use."
            )
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise ValueError(f"positions must be an integer tensor (token positions), got {positions.dtype}.")
        return self.score_tokens(features, positions, valid)

    def constant_score(self) -> float | None:
        """The score every token gets if it does not depend on the features (e.g. a zero read-out), else None.

        The cache uses this to skip observing attention when scores cannot depend on it.
        """
        readout = getattr(self, "readout", None)
        if isinstance(readout, nn.Linear) and not bool(readout.weight.detach().any()):
            return float(readout.bias.detach()[0]) if readout.bias is not None else 0.0
        return None

    def input_groups(self) -> dict[str, int]:
        """`{name: size}` of the input groups in input order: `"age"` (the recency embedding), `"attention
        spectrogram"`, then each of `extra_inputs`."""
        sizes = {"age": self.input_dim - self.n_bins - len(self.extra_inputs), "attention spectrogram": self.n_bins,
                 **{name: 1 for name in self.extra_inputs}}
        return {name: size for name, size in sizes.items() if size > 0}

    def inputs_read(self) -> tuple[list[str], list[str]]:
        """`(read, ignored)`: the input groups (`input_groups`) the scores can depend on, and those they cannot.
        Every group is read unless a scorer can tell otherwise: none when its scores are constant (`constant_score`),
        and for a linear one, no group whose weights are all zero."""
        if self.constant_score() is not None:
            return [], list(self.input_groups())
        return list(self.input_groups()), []

    # Evolution works on one flat vector of the trainable parameters (buffers are not included).
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def get_flat_params(self) -> torch.Tensor:
        """All trainable parameters as one detached float32 vector, in `named_parameters` order."""
        return torch.nn.utils.parameters_to_vector([p.detach() for p in self.parameters()]).to(torch.float32).clone()

    def set_flat_params(self, flat: torch.Tensor) -> None:
        """Load parameters from a vector produced by `get_flat_params` (same length, finite)."""
        flat = torch.as_tensor(flat, dtype=torch.float32).flatten()
        expected = self.num_parameters()
        if flat.numel() != expected:
            raise ValueError(f"{type(self).__name__} has {expected} parameters, got a vector of {flat.numel()}.")
        if not torch.isfinite(flat).all():
            raise ValueError("Parameter vector contains NaN or inf.")
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat.to(next(self.parameters()).device), list(self.parameters()))

    def config_dict(self) -> dict:
        """Constructor arguments that rebuild this scorer (used by save/load)."""
        return {"kind": self.kind, "input_dim": self.input_dim, "n_bins": self.n_bins}
