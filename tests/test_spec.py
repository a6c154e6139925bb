"""`CacheSpec`: one picklable description of a cache that every consumer builds from."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import random_scorer

from namm_cache import CacheSpec, NAMMCache, NAMMConfig
from namm_cache.policies import BASELINE_POLICIES, H2OPolicy, NAMMPolicy


def feed(model, cache, ids):
    with torch.no_grad():
        for part in ids.split(32, dim=1):
            model(input_ids=part, cache=cache)
    return cache


def test_a_spec_builds_what_the_direct_constructor_builds():
    model = tiny_model("llama", "sdpa")
    ids = random_ids(130)
    scorer = random_scorer(2)
    pairs = [
        (CacheSpec(scorer=scorer, budget=0.5, overrides={"update_interval": 32}),
         NAMMCache(model=model, scorer=scorer, budget=0.5, update_interval=32)),
        (CacheSpec(policy="h2o", budget=0.25, overrides={"update_interval": 32}),
         NAMMCache(model=model, policy="h2o", budget=0.25, update_interval=32)),
        (CacheSpec(policy="l2", budget=40, config=NAMMConfig(update_interval=32)),
         NAMMCache(model=model, policy="key_norm", budget=40, update_interval=32)),
    ]
    for spec, direct in pairs:
        built = feed(model, spec.build(model), ids)
        direct = feed(model, direct, ids)
        assert built.stats()["kept_per_layer"] == direct.stats()["kept_per_layer"]
        assert built.stats()["budget"] == direct.stats()["budget"] and built.policy == direct.policy
    assert isinstance(pairs[1][0].build(model).policy, H2OPolicy)


def test_a_scorer_name_is_loaded_once_and_its_settings_are_the_base():
    spec = CacheSpec(scorer="namm-cache/smollm2-135m-bam", overrides={"update_interval": 64})
    loaded = spec.load()
    assert not isinstance(loaded.scorer, str) and loaded.load() is loaded
    assert loaded.namm_config().update_interval == 64
    assert loaded.namm_config().n_fft == loaded.config.n_fft  # the stored feature settings
    cache = loaded.build(tiny_model("llama", "sdpa"))
    assert isinstance(cache.policy, NAMMPolicy) and cache.scorer is loaded.scorer
    assert spec.describe() == "namm@threshold" and CacheSpec(policy="h2o", budget=0.25).describe() == "h2o@0.25"


def test_specs_pickle_and_compare_as_data():
    specs = [CacheSpec(policy=p, budget=0.25) for p in BASELINE_POLICIES] + [
        CacheSpec(scorer="namm-cache/keep-all", overrides={"max_tokens": 64}), CacheSpec(policy="full")]
    for spec in specs:
        assert pickle.loads(pickle.dumps(spec)) == spec
    overrides = {"update_interval": 32}
    spec = CacheSpec(policy="tova", budget=8, overrides=overrides)
    overrides["update_interval"] = 48  # the spec keeps its own copy
    assert spec.overrides == {"update_interval": 32}


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "nonsense"}, "Unknown policy"),
    ({"policy": "h2o", "scorer": "namm-cache/keep-all"}, "only applies to the 'namm' policy"),
    ({"policy": "h2o", "budget": "lots"}, "budget"),
    ({"overrides": {"update_intervall": 32}}, "update_intervall"),
    ({"overrides": {"threshold": float("nan")}}, "threshold"),
    ({"scorer": 3}, "scorer must be"),
    ({"policy_kwargs": {"window": 8}}, "policy_kwargs"),
    ({"policy": "h2o"}, "no calibrated score threshold"),
    ({"policy": "full", "budget": 0.25}, "takes no budget"),
    ({"policy": "h2o", "budget": 0.25, "overrides": {"min_fraction": 0.5}}, r"min_fraction applies .* budget \(25% of"),
    ({"budget": 64, "overrides": {"threshold": 1.0}}, r"threshold applies .* budget \(64 tokens\)"),
    ({"policy": "full", "overrides": {"min_fraction": 0.5}}, "'full' policy keeps every token"),
    ({"policy": "full", "overrides": {"threshold": 0.5}}, "'full' policy keeps every token"),
])
def test_bad_specs_are_refused_when_written(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CacheSpec(**kwargs)
