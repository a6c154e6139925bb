"""The NAMM feature pipeline as pure tensor functions (no cache knowledge).

Per cached token, the attention it receives from successive queries is a time series. Its short-time
Fourier transform (magnitude, periodic Hann window, `n_fft=32`, hop 16, `center=False`) gives 17 bins per
frame; frames are reduced with an exponential moving average carried across updates. The reduced
spectrogram is z-normalised with stored statistics and prefixed with a sinusoidal embedding of the
token's age, giving the `recency_dim + n_bins` features a scorer reads.

The time series is consumed as a stream: each token carries the last `hop_length` values already
framed (its *tail*) and up to `hop_length - 1` values not yet framed (its *pending* values). Folding new
attention rows in any chunking gives the same result as framing the whole series at once, which is what
lets prefill chunks and single decode steps share one code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import NAMMConfig


def hann_window(n_fft: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Periodic Hann window of length `n_fft` (the STFT convention)."""
    return torch.hann_window(n_fft, periodic=True, dtype=dtype, device=device)


def stft_magnitude(series: torch.Tensor, config: NAMMConfig) -> torch.Tensor:
    """Magnitude STFT of attention time series.

    Args:
        series: `(N, T)` attention values, time last, with `T >= n_fft`.
        config: supplies `n_fft` and `hop_length`.

    Returns:
        `(N, n_bins, frames)` with `frames = (T - n_fft) // hop_length + 1`.
    """
    if series.shape[-1] < config.n_fft:
        raise ValueError(f"Need at least n_fft={config.n_fft} values per series, got {series.shape[-1]}.")
    window = hann_window(config.n_fft, dtype=series.dtype, device=series.device)
    spectrum = torch.stft(
        series,
        n_fft=config.n_fft,
        hop_length=config.hop_length,
        window=window,
        center=False,
        onesided=True,
        return_complex=True,
    )
    # |z| as sqrt(re^2 + im^2) on the real view: the same value as `spectrum.abs()` (no overflow at these
    # magnitudes) in a third of the time on CPU, where complex abs is the single slowest step of the fold.
    parts = torch.view_as_real(spectrum)
    real, imaginary = parts[..., 0], parts[..., 1]
    return (real * real).addcmul_(imaginary, imaginary).sqrt_()


def ema_over_frames(frames: torch.Tensor, previous: torch.Tensor, frame_decay: float) -> torch.Tensor:
    """Fold `F` new frames into an exponential moving average.

    `ema = frame_decay**F * previous + sum_f frame_decay**(F - 1 - f) * frames[..., f]`: the newest frame
    has weight 1, and the previous EMA decays by one factor per new frame (`gamma ** new_queries`).

    Args:
        frames: `(..., n_bins, F)`.
        previous: `(..., n_bins)`.
    """
    n_frames = frames.shape[-1]
    exponents = torch.arange(n_frames - 1, -1, -1, device=frames.device, dtype=frames.dtype)
    weights = torch.pow(torch.tensor(frame_decay, dtype=frames.dtype, device=frames.device), exponents)
    return torch.matmul(frames, weights).add_(previous, alpha=frame_decay**n_frames)


@dataclass
class SpectrogramState:
    """Streaming state of the attention spectrogram of a set of tokens.

    Attributes:
        ema: `(N, n_bins)` EMA of the frames computed so far.
        tail: `(N, hop_length)` last values already framed (zeros for a new token).
        pending: `(N, hop_length)` values not yet framed; the first `pending_count` are meaningful.
        pending_count: how many pending values every series in this state holds (shared).
    """

    ema: torch.Tensor
    tail: torch.Tensor
    pending: torch.Tensor
    pending_count: int

    @classmethod
    def zeros(cls, n: int, config: NAMMConfig, *, dtype=torch.float32, device="cpu") -> "SpectrogramState":
        return cls(
            ema=torch.zeros(n, config.n_bins, dtype=dtype, device=device),
            tail=torch.zeros(n, config.hop_length, dtype=dtype, device=device),
            pending=torch.zeros(n, config.hop_length, dtype=dtype, device=device),
            pending_count=0,
        )


def fold_attention(state: SpectrogramState, new_values: torch.Tensor, config: NAMMConfig) -> SpectrogramState:
    """Fold new attention values into a streaming spectrogram state.

    Args:
        state: the state before; its tensors hold series with leading shape `L` (`(N,)` or e.g.
            `(batch, heads, slots)`), then `n_bins` / `hop_length`.
        new_values: `(*L, q)` attention each series' token received from `q` new queries, oldest first. Any
            strides: a transposed view of the attention probabilities is copied once, into the series.
        config: supplies `n_fft`, `hop_length`, `ema_gamma`.

    Returns:
        The new state. Whole frames (`hop_length` new values each) are taken as soon as they are complete,
        so the result does not depend on how the queries were chunked.
    """
    hop = config.hop_length
    count = state.pending_count
    q = new_values.shape[-1]
    if q == 0:
        return state
    lead = new_values.shape[:-1]
    dtype = state.pending.dtype
    n_frames = (count + q) // hop
    leftover = count + q - n_frames * hop
    ema, tail = state.ema, state.tail
    if n_frames > 0:
        # [tail | pending | new values that complete frames], built in one buffer (one copy of the new values).
        framed_new = n_frames * hop - count
        series = torch.empty(*lead, hop + n_frames * hop, dtype=dtype, device=new_values.device)
        series[..., :hop] = tail
        series[..., hop : hop + count] = state.pending[..., :count]
        series[..., hop + count :] = new_values[..., :framed_new]
        frames = stft_magnitude(series.view(-1, series.shape[-1]), config)
        ema = ema_over_frames(frames, ema.reshape(-1, ema.shape[-1]), config.frame_decay).view(ema.shape)
        tail = series[..., -hop:].clone()
        rest = new_values[..., framed_new:]
        pending = torch.zeros_like(state.pending)
    else:
        rest = new_values
        pending = state.pending.clone()
        pending[..., count:] = 0.0
    if leftover:
        pending[..., count if n_frames == 0 else 0 : leftover] = rest
    return SpectrogramState(ema=ema, tail=tail, pending=pending, pending_count=leftover)


def recency_embedding(age: torch.Tensor, dim: int, max_frequency: float) -> torch.Tensor:
    """Sinusoidal embedding of token ages.

    Args:
        age: `(...)` non-negative ages (newest position minus the token's position).
        dim: even embedding size; `dim // 2` frequencies `max_frequency ** (-2i / dim)`.

    Returns:
        `(..., dim)`: sines of all frequencies, then cosines.
    """
    if dim == 0:
        return age.new_zeros(*age.shape, 0, dtype=torch.float32)
    exponents = torch.arange(0, dim, 2, device=age.device, dtype=torch.float32) / dim
    inverse_frequency = torch.exp(-math.log(max_frequency) * exponents)
    angles = age.to(torch.float32).unsqueeze(-1) * inverse_frequency
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def normalize_spectrogram(ema: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """z-normalise `(..., n_bins)` spectrogram features with stored per-bin statistics."""
    return (ema - mean.to(ema)) / (std.to(ema) + eps)


def token_features(
    ema: torch.Tensor,
    age: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    config: NAMMConfig,
) -> torch.Tensor:
    """The scorer's input: `(..., recency_dim + n_bins)` = [age embedding, normalised spectrogram]."""
    recency = recency_embedding(age, config.recency_dim, config.recency_max_frequency)
    return torch.cat([recency, normalize_spectrogram(ema.to(torch.float32), mean, std)], dim=-1)


def log_norms(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`(..., S, 2)`: log L2 norm of each token's key and value (`(..., S, head_dim)` each). RoPE rotates
    keys, so a cached (post-RoPE) key has its pre-RoPE norm."""
    norms = torch.stack([keys.float().norm(dim=-1), values.float().norm(dim=-1)], dim=-1)
    return norms.clamp_min(1e-12).log()


def standardize_rows(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """z-score `(N, S, k)` values within each row over its `valid` `(N, S)` tokens (0 for the others).

    Scale-free across layers and heads, whose key norms differ by orders of magnitude; one shared scorer
    then reads "how unusual is this token's norm among the tokens this head holds"."""
    weight = valid.unsqueeze(-1).to(values.dtype)
    count = weight.sum(1, keepdim=True).clamp_min(1.0)
    mean = (values * weight).sum(1, keepdim=True) / count
    spread = (((values - mean) ** 2) * weight).sum(1, keepdim=True) / count
    return ((values - mean) / spread.sqrt().clamp_min(1e-6)) * weight


def norm_features(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`(N, S, 2)`: each token's log key norm and log value norm, z-scored within its (layer, head) row."""
    return standardize_rows(log_norms(keys, values), valid)


# The extra inputs a scorer may read, in the order they follow the paper's features.
NORM_INPUTS = ("key_norm", "value_norm")
POOLED_INPUTS = ("key_norm", "value_norm", "pooled_key_norm")
ALL_LAYER_INPUTS = ("key_norm", "value_norm", "all_layer_key_norm")
# The inputs that need a value pooled over layers (`namm_cache.ledger`), which one layer alone cannot compute.
LEDGER_INPUTS = ("pooled_key_norm", "all_layer_key_norm")


def reads_ledger(extra_inputs: tuple[str, ...]) -> bool:
    """Whether a scorer with these `extra_inputs` reads a key norm pooled over layers (`namm_cache.ledger`)."""
    return any(name in LEDGER_INPUTS for name in extra_inputs)


def with_extra_inputs(extra_inputs: tuple[str, ...], features: torch.Tensor, token_log_norms: torch.Tensor | None,
                      valid: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """`features` `(N, S, F)` followed by what a scorer's `extra_inputs` name: the key and value norms
    (`token_log_norms` `(N, S, 2)` from `log_norms`) and, for `POOLED_INPUTS` / `ALL_LAYER_INPUTS`, the key norm
    pooled over layers (`pooled` `(N, S)`: `namm_cache.ledger`, over the layers up to the scoring one or over
    every layer), each standardised over the row's `valid` tokens.
    The one place the cache's policy, the replay fitness and distillation append them."""
    if not extra_inputs:
        return features
    extra_inputs = tuple(extra_inputs)
    if extra_inputs not in (NORM_INPUTS, POOLED_INPUTS, ALL_LAYER_INPUTS):
        raise ValueError(f"Unknown scorer inputs {extra_inputs}; known: {NORM_INPUTS}, {POOLED_INPUTS} and {ALL_LAYER_INPUTS}.")
    if token_log_norms is None:
        raise ValueError("This scorer reads key and value norms, but none were recorded.")
    inputs = token_log_norms
    if reads_ledger(extra_inputs):
        if pooled is None:
            raise ValueError("This scorer reads the pooled key norm of several layers (namm_cache.ledger), but none was given: "
                             "it is computed by a NAMMCache or by the replay fitness, not from one layer alone.")
        inputs = torch.cat([token_log_norms, pooled.unsqueeze(-1).to(token_log_norms.dtype)], dim=-1)
    return torch.cat([features, standardize_rows(inputs, valid)], dim=-1)


class RunningMoments:
    """Streaming per-feature mean and standard deviation (Chan et al. parallel update), in float64."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def update(self, samples: torch.Tensor) -> None:
        """Add `(n, dim)` samples."""
        samples = samples.detach().to(torch.float64).reshape(-1, self.mean.shape[0]).cpu()
        n = samples.shape[0]
        if n == 0:
            return
        batch_mean = samples.mean(0)
        batch_m2 = ((samples - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        if self.count < 2:
            raise ValueError("Need at least two samples to compute a standard deviation.")
        return (self.m2 / (self.count - 1)).sqrt()
