"""Per-token statistics: the registry, each built-in fold rule, and a new statistic added as one class."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
from conftest import random_ids, tiny_model

from namm_cache import NAMMCache, NAMMConfig
from namm_cache.features import SpectrogramState, fold_attention
from namm_cache.policies import (
    BASELINE_POLICIES,
    POLICIES,
    H2OPolicy,
    Observation,
    Policy,
    SnapKVPolicy,
    baseline_names,
    build_policy,
)
from namm_cache.statistics import STATISTICS, AttentionStep, Statistic, register_statistic


def test_a_policy_that_needs_an_unknown_statistic_is_refused_when_built():
    @dataclasses.dataclass(frozen=True)
    class NeedsNothingKnown(Policy):
        name = "needs-nothing-known"
        needs = frozenset({"attention_sum", "key_entropy"})

    with pytest.raises(ValueError, match=r"unknown statistic\(s\) \['key_entropy'\].*known: \[.*'attention_sum'"):
        NeedsNothingKnown()


def test_window_attention_needs_a_window_setting():
    class NoWindow(Policy):
        name = "no-window"
        needs = frozenset({"window_attention"})

    with pytest.raises(ValueError, match="integer `window`"):
        NoWindow()


def step(probabilities, real_queries=None, seen=None, points=None):
    batch = probabilities.shape[0]
    return AttentionStep(probabilities, real_queries, list(seen or [0] * batch), list(points or [100] * batch))


def allocated(name, policy=None, batch=2, heads=1, slots=3):
    statistic = STATISTICS[name](policy, NAMMConfig())
    statistic.allocate(batch, heads, slots, torch.device("cpu"))
    return statistic


def test_attention_sum_adds_real_queries_only():
    probabilities = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    real = torch.tensor([[False, True, True], [True, True, True]])
    statistic = allocated("attention_sum")
    statistic.fold(step(probabilities, real))
    assert torch.equal(statistic.tensors["attention_sum"][0, 0], probabilities[0, 0, 1:].sum(0))
    assert torch.equal(statistic.tensors["attention_sum"][1, 0], probabilities[1, 0].sum(0))


def test_last_attention_is_the_newest_real_query():
    probabilities = torch.rand(2, 1, 3, 3)
    real = torch.tensor([[True, True, False], [False, False, False]])
    statistic = allocated("last_attention")
    statistic.fold(step(probabilities, real))
    assert torch.equal(statistic.tensors["last_attention"][0, 0], probabilities[0, 0, 1])
    assert torch.count_nonzero(statistic.tensors["last_attention"][1]) == 0  # no real query: unchanged


def test_window_attention_sums_the_window_before_the_eviction_point_and_resets_on_eviction():
    probabilities = torch.rand(1, 1, 6, 3)
    statistic = allocated("window_attention", SnapKVPolicy(window=2), batch=1)
    # Real queries 11..16 of the row; eviction at 14: the window is queries 13 and 14 (indices 2, 3).
    statistic.fold(step(probabilities, seen=[10], points=[14]))
    assert torch.allclose(statistic.tensors["window_attention"][0, 0], probabilities[0, 0, 2:4].sum(0))
    statistic.evicted(torch.tensor([0]))
    assert torch.count_nonzero(statistic.tensors["window_attention"]) == 0


def test_spectrogram_folds_each_row_like_fold_attention():
    config = NAMMConfig()
    probabilities = torch.rand(2, 1, 20, 3)
    real = torch.ones(2, 20, dtype=torch.bool)
    real[0, :4] = False  # row 0 is left-padded: its series has 16 values, row 1's has 20
    statistic = allocated("spectrogram")
    statistic.fold(step(probabilities, real))
    for b, rows in enumerate(real):
        state = fold_attention(SpectrogramState.zeros(3, config), probabilities[b, 0, rows].T, config)
        assert statistic.pending_count[b] == state.pending_count
        assert torch.allclose(statistic.tensors["ema"][b, 0], state.ema)
        assert torch.allclose(statistic.tensors["pending"][b, 0], state.pending)
    statistic.select_rows([1, 1])
    assert statistic.pending_count == [4, 4]


def test_observation_reads_statistics_by_name_and_as_attributes():
    values = torch.ones(1, 4)
    observation = Observation(0, torch.zeros(1, 4, 2), torch.arange(4).view(1, 4), torch.ones(1, 4, dtype=torch.bool),
                              torch.zeros(1, 4), NAMMConfig(), statistics={"attention_sum": values})
    assert observation.statistics["attention_sum"] is values and observation.attention_sum is values
    assert observation.last_attention is None and observation.values is None
    with pytest.raises(AttributeError):
        observation.no_such_field  # noqa: B018
    with pytest.raises(TypeError, match="unknown field"):
        Observation(0, None, None, None, None, NAMMConfig(), key_entropy=values)


@pytest.fixture
def attention_max():
    """A statistic added the documented way: one class, registered by name (removed after the test)."""

    @register_statistic
    class AttentionMax(Statistic):
        name = "attention_max"

        def fold(self, step):
            masked = step.probabilities * step.real.to(step.probabilities.dtype)[:, None, :, None]
            torch.maximum(self.tensors["attention_max"], masked.amax(2), out=self.tensors["attention_max"])

    yield AttentionMax
    del STATISTICS["attention_max"]


def test_a_new_statistic_is_one_class_and_a_policy_reads_it_with_the_values(attention_max):
    @dataclasses.dataclass(frozen=True)
    class PeakAttentionPolicy(Policy):
        scale: float = 1.0
        name = "peak-attention"
        needs = frozenset({"attention_max"})
        seen: ClassVar[list] = []

        def score(self, observation):
            self.seen.append(observation)
            return observation.statistics["attention_max"] * self.scale + observation.values.norm(dim=-1) * 0

    model = tiny_model("llama", "sdpa")
    cache = NAMMCache(model=model, policy=PeakAttentionPolicy(), budget=16, update_interval=16)
    model.generate(random_ids(50), cache=cache, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                   prefill_chunk_size=16, pad_token_id=0)
    stats = cache.stats()
    assert stats["evicted_tokens"] > 0 and stats["policy"] == "peak-attention" and stats["policy_settings"] == {"scale": 1.0}
    observation = PeakAttentionPolicy.seen[-1]
    assert observation.statistics["attention_max"].shape == observation.valid.shape
    assert observation.values.shape == observation.keys.shape
    assert float(observation.statistics["attention_max"][observation.valid].max()) > 0
    for layer in cache.namm_layers:  # the new state moved with every compaction
        assert layer.per_token_tensors()["attention_max.attention_max"].shape == layer.token_valid.shape


def test_policies_are_frozen_dataclasses_with_their_settings_in_repr():
    policy = build_policy("h2o", recent_ratio=0.25)
    assert repr(policy) == "H2OPolicy(recent_ratio=0.25)" and policy.settings() == {"recent_ratio": 0.25}
    assert policy == H2OPolicy(0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.recent_ratio = 0.5
    assert repr(build_policy("snapkv")) == "SnapKVPolicy(window=32, kernel_size=7)"
    with pytest.raises(ValueError, match="recent_ratio"):
        H2OPolicy(recent_ratio=2.0)


def test_baselines_come_from_the_registry():
    assert BASELINE_POLICIES == ("h2o", "key_norm", "streaming_llm", "snapkv", "tova", "random")
    assert baseline_names() == list(BASELINE_POLICIES) and set(BASELINE_POLICIES) < set(POLICIES)
