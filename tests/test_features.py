"""The feature pipeline against an independent float64 reference (numpy FFT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from namm_cache import NAMMConfig
from namm_cache.features import (
    RunningMoments,
    SpectrogramState,
    fold_attention,
    recency_embedding,
    token_features,
)


def reference_update(series_tail: np.ndarray, new: np.ndarray, previous_ema: np.ndarray, gamma: float = 0.99):
    """The paper's per-update formula, written from scratch in float64.

    series_tail: (N, 16) last values of the previous update; new: (N, Q) with Q a multiple of 16.
    """
    n_fft, hop = 32, 16
    series = np.concatenate([series_tail, new], axis=1)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = []
    for start in range(0, series.shape[1] - n_fft + 1, hop):
        frames.append(np.abs(np.fft.rfft(series[:, start : start + n_fft] * window, axis=1)))
    frames = np.stack(frames, axis=-1)  # (N, 17, F)
    n_frames = frames.shape[-1]
    frame_gamma = gamma**hop
    ema = previous_ema * gamma ** new.shape[1]
    for f in range(n_frames):
        ema = ema + frames[..., f] * frame_gamma ** (n_frames - 1 - f)
    return ema, series[:, -hop:]


@pytest.mark.parametrize("chunks", [[64, 64], [48, 16, 7, 9, 32, 1, 15], [1] * 128, [100, 28]])
def test_streaming_fold_matches_float64_reference_across_two_updates(chunks):
    config = NAMMConfig()
    rng = np.random.default_rng(0)
    n = 6
    # Attention values of two updates of 64 queries each.
    updates = [rng.random((n, 64)), rng.random((n, 64))]
    ema_ref, tail_ref = np.zeros((n, 17)), np.zeros((n, 16))
    for values in updates:
        ema_ref, tail_ref = reference_update(tail_ref, values, ema_ref)

    stream = torch.tensor(np.concatenate(updates, axis=1), dtype=torch.float32)
    state = SpectrogramState.zeros(n, config)
    start = 0
    for size in chunks:
        state = fold_attention(state, stream[:, start : start + size], config)
        start += size
    assert start == 128
    assert state.pending_count == 0
    np.testing.assert_allclose(state.ema.double().numpy(), ema_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.tail.double().numpy(), tail_ref, rtol=0, atol=1e-7)


def test_pending_values_wait_for_a_whole_frame():
    config = NAMMConfig()
    state = SpectrogramState.zeros(2, config)
    state = fold_attention(state, torch.ones(2, 10), config)
    assert state.pending_count == 10
    assert torch.count_nonzero(state.ema) == 0
    state = fold_attention(state, torch.ones(2, 6), config)
    assert state.pending_count == 0
    assert torch.count_nonzero(state.ema) > 0


def test_layer_observations_match_reference():
    """The cache layer's state after observing random attention in chunks equals the reference."""
    from namm_cache.cache import NAMMLayer
    from namm_cache.policies import NAMMPolicy
    from namm_cache.scorers import BAMScorer

    config = NAMMConfig(update_interval=64)
    layer = NAMMLayer(0, config, NAMMPolicy(BAMScorer()))
    rng = np.random.default_rng(1)
    heads, groups, head_dim = 2, 2, 4
    total = 128
    attention = rng.random((heads, total, total))  # (kv head, query, token); the query axis is time
    attention = np.tril(attention)  # a token receives attention only once it exists
    for start, size in [(0, 40), (40, 24), (64, 1), (65, 1), (66, 1), (67, 61)]:  # decode-like single steps too
        keys = torch.zeros(1, heads, size, head_dim)
        layer.update(keys, keys)
        slots = layer.keys.shape[-2]
        block = torch.tensor(attention[:, start : start + size, :slots], dtype=torch.float32)
        # Query heads of one group see the same probabilities, so the group mean is the value itself.
        weights = block.unsqueeze(1).expand(heads, groups, size, slots).reshape(1, heads * groups, size, slots)
        layer.observe(weights, torch.zeros(1, size, dtype=torch.bool), size)
    assert layer.keys.shape[-2] == total  # the zero scorer keeps everything

    ema = np.zeros((heads * total, 17))
    tail = np.zeros((heads * total, 16))
    per_token = attention.transpose(0, 2, 1).reshape(heads * total, total)  # (head*token, query)
    for update in range(2):
        ema, tail = reference_update(tail, per_token[:, update * 64 : (update + 1) * 64], ema)
    np.testing.assert_allclose(layer.ema.reshape(-1, 17).double().numpy(), ema, rtol=1e-5, atol=1e-5)


def test_recency_embedding_is_sinusoidal():
    age = torch.tensor([0.0, 1.0, 1000.0])
    emb = recency_embedding(age, 8, 50000.0)
    assert emb.shape == (3, 8)
    frequencies = 50000.0 ** (-torch.arange(0, 8, 2) / 8)
    torch.testing.assert_close(emb[:, :4], torch.sin(age[:, None] * frequencies))
    torch.testing.assert_close(emb[:, 4:], torch.cos(age[:, None] * frequencies))


def test_token_features_layout_and_normalisation():
    config = NAMMConfig()
    ema = torch.rand(5, 17)
    mean, std = torch.rand(17), torch.rand(17) + 0.5
    features = token_features(ema, torch.arange(5), mean, std, config)
    assert features.shape == (5, 25)
    torch.testing.assert_close(features[:, 8:], (ema - mean) / (std + 1e-8))


def test_running_moments_match_direct_computation():
    data = torch.randn(1000, 17, dtype=torch.float64) * 3 + 1
    moments = RunningMoments(17)
    for part in data.split(137):
        moments.update(part)
    torch.testing.assert_close(moments.mean, data.mean(0))
    torch.testing.assert_close(moments.std, data.std(0))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"update_interval": 500}, "multiple of hop_length"),
        ({"n_fft": 30}, "twice hop_length"),
        ({"recency_dim": 7}, "even"),
        ({"ema_gamma": 1.5}, "ema_gamma"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"threshold": "-1.0e9"}, "threshold must be a number or None"),  # YAML reads -1.0e9 as a string
        ({"max_tokens": 256.5}, "max_tokens must be an integer or None"),
        ({"update_interval": "128"}, "update_interval must be an integer"),
    ],
)
def test_bad_config_values_raise_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        NAMMConfig(**changes)
