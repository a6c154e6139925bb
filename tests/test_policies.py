"""Baseline policies: each keeps exactly what its rule says; every policy x budget runs in the cache."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_ids, tiny_model

from namm_cache import NAMMCache, NAMMConfig
from namm_cache.budgets import FractionBudget, ThresholdBudget, TokenBudget, parse_budget
from namm_cache.policies import (
    FullCachePolicy,
    H2OPolicy,
    KeyNormPolicy,
    Observation,
    RandomPolicy,
    SnapKVPolicy,
    StreamingLLMPolicy,
    TOVAPolicy,
    build_policy,
)
from namm_cache.selection import select_tokens


def observation(n_tokens: int = 10, budget: int = 4, **fields) -> Observation:
    positions = torch.arange(n_tokens).unsqueeze(0)
    valid = torch.ones(1, n_tokens, dtype=torch.bool)
    base = dict(
        layer_idx=0,
        keys=torch.randn(1, n_tokens, 8),
        positions=positions,
        valid=valid,
        age=(n_tokens - 1) - positions,
        spectrogram=torch.zeros(1, n_tokens, 17),
        config=NAMMConfig(),
        budget=torch.tensor([budget]),
    )
    base.update(fields)
    return Observation(**base)


def kept(policy, obs) -> list[int]:
    scores = policy.score(obs)
    keep = select_tokens(scores, obs.valid, obs.positions, threshold=None, max_tokens=obs.budget)
    return obs.positions[keep].tolist()


def test_streaming_llm_keeps_sinks_and_the_last_window():
    assert kept(StreamingLLMPolicy(sinks=2), observation(12, budget=5)) == [0, 1, 9, 10, 11]


def test_streaming_llm_sinks_are_the_first_real_tokens():
    obs = observation(8, budget=4)
    obs.valid[0, :3] = False  # left padding
    assert kept(StreamingLLMPolicy(sinks=2), obs) == [3, 4, 6, 7]


def test_key_norm_keeps_the_lowest_norm_keys():
    keys = torch.ones(1, 8, 4)
    norms = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0, 7.0, 4.0])
    keys = keys * norms.view(1, 8, 1)
    # budget 3: the newest token (index 7) is always kept, plus the two lowest-norm keys (3, 1).
    assert kept(KeyNormPolicy(), observation(8, budget=3, keys=keys)) == [1, 3, 7]


def test_tova_follows_the_last_query():
    last = torch.tensor([[0.05, 0.4, 0.0, 0.3, 0.05, 0.1, 0.02, 0.08]])
    assert kept(TOVAPolicy(), observation(8, budget=3, last_attention=last)) == [1, 3, 7]


def test_h2o_keeps_recent_half_and_heavy_hitters():
    accumulated = torch.tensor([[9.0, 0.1, 5.0, 0.2, 0.3, 4.0, 0.1, 0.1, 0.2, 0.1]])
    # budget 4: two most recent (8, 9) + two heaviest (0, 2).
    assert kept(H2OPolicy(), observation(10, budget=4, attention_sum=accumulated)) == [0, 2, 8, 9]


def test_snapkv_pools_window_attention_and_keeps_the_window():
    window_attention = torch.zeros(1, 12)
    window_attention[0, 3] = 1.0  # one spike: pooling spreads it to its neighbours
    policy = SnapKVPolicy(window=2, kernel_size=3)
    # budget 5: window (10, 11) + the spike and its two pooled neighbours (2, 3, 4).
    assert kept(policy, observation(12, budget=5, window_attention=window_attention)) == [2, 3, 4, 10, 11]


def test_random_is_seeded():
    obs = observation(20, budget=6)
    assert kept(RandomPolicy(seed=1), obs) == kept(RandomPolicy(seed=1), obs)
    assert kept(RandomPolicy(seed=1), obs) != kept(RandomPolicy(seed=2), obs)


def test_budget_parsing():
    assert parse_budget(512) == TokenBudget(512)
    assert parse_budget(0.25) == FractionBudget(0.25)
    assert parse_budget("25%") == FractionBudget(0.25)
    assert parse_budget("threshold") == ThresholdBudget()
    assert FractionBudget(0.25).tokens_for(10) == 3
    for bad in (0, -3, 1.5, "lots", True):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_budget_kinds_that_make_no_sense_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no calibrated score threshold"):
        NAMMCache(model=model, policy="h2o")
    with pytest.raises(ValueError, match="no calibrated score threshold"):
        NAMMCache(model=model, policy="tova", budget="threshold")
    with pytest.raises(ValueError, match="takes no budget"):
        NAMMCache(model=model, policy="full", budget=64)
    with pytest.raises(ValueError, match="Unknown policy"):
        NAMMCache(model=model, policy="lru", budget=64)
    with pytest.raises(ValueError, match="only applies to the 'namm' policy"):
        from namm_cache import BAMScorer

        NAMMCache(model=model, policy="h2o", budget=64, scorer=BAMScorer())
    assert isinstance(build_policy("l2"), KeyNormPolicy)
    assert isinstance(build_policy("full"), FullCachePolicy)


POLICY_NAMES = ["namm", "h2o", "key_norm", "streaming_llm", "snapkv", "tova", "random"]
BUDGETS = {"tokens": 40, "fraction": 0.3}


def run_generate(model, ids, cache, mask=None):
    return model.generate(
        ids,
        attention_mask=mask if mask is not None else torch.ones_like(ids),
        cache=cache,
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        prefill_chunk_size=32,
        pad_token_id=0,
    )


def make_cache(model, policy, budget):
    from helpers import random_scorer

    scorer = random_scorer(1) if policy == "namm" else None
    return NAMMCache(model=model, policy=policy, budget=budget, scorer=scorer, update_interval=32)


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("budget_kind", list(BUDGETS))
def test_every_policy_at_every_budget_respects_it_and_batches_match_rows(policy, budget_kind):
    model = tiny_model("llama", "sdpa")
    budget = BUDGETS[budget_kind]
    prompts = [random_ids(120, seed=1), random_ids(75, seed=2)]
    alone = []
    for p in prompts:
        cache = make_cache(model, policy, budget)
        alone.append(run_generate(model, p, cache)[0, p.shape[1] :])
        seen = cache.namm_layers[0].real_tokens_seen[0]
        evicted_at = (seen // 32) * 32  # last eviction round
        limit = budget if isinstance(budget, int) else math.ceil(budget * evicted_at)
        for layer in cache.namm_layers:
            assert int(layer.kept_per_head().max()) <= limit + (seen - evicted_at)
        assert cache.stats()["evicted_tokens"] > 0
    width = 120
    batch = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - p.shape[1] :] = p[0]
        mask[i, width - p.shape[1] :] = 1
    out = run_generate(model, batch, make_cache(model, policy, budget), mask)[:, width:]
    for i in range(2):
        assert torch.equal(out[i], alone[i]), f"{policy}: row {i} differs from its prompt alone"


def test_namm_threshold_budget_and_full_policy_run_in_the_cache():
    model = tiny_model("qwen3", "sdpa")
    ids = random_ids(100)
    full = NAMMCache(model=model, policy="full", update_interval=32)
    run_generate(model, ids, full)
    assert full.stats()["evicted_tokens"] == 0
    assert not full.namm_layers[0].observing
    assert full.stats()["budget"] == "none (full cache)"
    # A full cache built from a config that carries a threshold, a floor and a cap still keeps every token.
    strict = NAMMCache(model=model, policy="full", config=NAMMConfig(update_interval=32, threshold=0.5, min_fraction=0.1, max_tokens=8))
    run_generate(model, ids, strict)
    assert strict.stats()["evicted_tokens"] == 0 and strict.kept_fraction() == 1.0
    capped = NAMMCache(model=model, policy="h2o", budget=0.25, max_tokens=20)
    assert capped.stats()["budget"] == "25% of tokens seen, at most 20 tokens"
    namm = make_cache(model, "namm", "threshold")
    run_generate(model, ids, namm)
    assert namm.stats()["budget"] == "score threshold 0"
    floored = NAMMCache(model=model, update_interval=32, min_fraction=0.5, max_tokens=80)
    assert floored.stats()["budget"] == "score threshold 0, at most 80 tokens, at least 50% of tokens seen"
    keep_all = NAMMCache(model=model, update_interval=32, threshold=None)
    run_generate(model, ids, keep_all)
    assert keep_all.stats()["evicted_tokens"] == 0 and "keeps every token" in keep_all.stats()["budget"]


def test_settings_a_budget_or_policy_would_ignore_are_refused():
    from namm_cache import CacheSpec

    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match=r"min_fraction applies to the scorer's threshold, but the budget \(25% of tokens seen\)"):
        NAMMCache(model=model, budget=0.25, min_fraction=0.5)
    with pytest.raises(ValueError, match=r"threshold applies .* budget \(64 tokens\)"):
        NAMMCache(model=model, policy="h2o", budget=64, threshold=5.0)
    for setting in ({"min_fraction": 0.5}, {"threshold": 0.5}, {"max_tokens": 8}):
        with pytest.raises(ValueError, match="'full' policy keeps every token"):
            NAMMCache(model=model, policy="full", **setting)
    with pytest.raises(ValueError, match="min_fraction applies"):
        CacheSpec(policy="h2o", budget=0.25, overrides={"min_fraction": 0.5}).build(model)
    with pytest.raises(ValueError, match="threshold and min_fraction apply .* would ignore them"):
        NAMMCache.from_pretrained("namm-cache/keep-all", model=model, budget=0.25, threshold=1.0, min_fraction=0.5)
    # Under the threshold both settings act; a budget with neither given is fine.
    assert NAMMCache(model=model, budget="threshold", min_fraction=0.5).namm_config.min_fraction == 0.5
    assert NAMMCache(model=model, budget=0.25, threshold=None).budget.fraction == 0.25


def test_policies_that_need_no_attention_do_not_observe():
    model = tiny_model("llama", "sdpa")
    for name, observes in [("key_norm", False), ("streaming_llm", False), ("random", False), ("pooled_key_norm", False),
                           ("h2o", True), ("tova", True), ("snapkv", True)]:
        cache = NAMMCache(model=model, policy=name, budget=16, update_interval=16)
        run_generate(model, random_ids(40), cache)
        assert cache.namm_layers[0].observing is observes, name


def test_full_policy_ignores_a_cap_in_the_config():
    """The full-cache reference must never evict, even when the config it shares carries max_tokens."""
    model = tiny_model("llama", "sdpa")
    cache = NAMMCache(model=model, policy="full", config=NAMMConfig(update_interval=16, max_tokens=8))
    run_generate(model, random_ids(60), cache)
    assert cache.stats()["evicted_tokens"] == 0 and cache.namm_config.max_tokens is None
