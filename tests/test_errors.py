"""Modes the cache cannot serve, and bad input, fail loudly with errors that name the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import random_scorer
from transformers import DynamicCache

from namm_cache import BAMScorer, MLPScorer, NAMMCache, NAMMConfig


def test_scorer_dims_must_match_feature_config():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="input_dim=25"):
        NAMMCache(model=model, scorer=BAMScorer(input_dim=20, n_bins=12))
    with pytest.raises(ValueError, match="input_dim=17"):
        NAMMCache(model=model, scorer=MLPScorer(), recency_dim=0)


def test_update_interval_must_be_a_multiple_of_the_hop():
    with pytest.raises(ValueError, match="multiple of hop_length"):
        NAMMCache(model=tiny_model("llama"), update_interval=100)


def test_unknown_override_is_refused():
    with pytest.raises(ValueError, match="Unknown NAMMConfig field"):
        NAMMCache(model=tiny_model("llama"), update_intervall=64)


def test_nan_scores_raise_instead_of_evicting():
    model = tiny_model("llama")
    scorer = random_scorer(0)
    with torch.no_grad():
        scorer.readout.bias.fill_(float("nan"))
    cache = NAMMCache(model=model, scorer=scorer, update_interval=16)
    with pytest.raises(ValueError, match="NaN or inf"):
        with torch.no_grad():
            for chunk in random_ids(48).split(16, dim=1):
                model(input_ids=chunk, cache=cache)


def test_model_without_full_attention_layers_is_refused():
    model = tiny_model("mistral", sliding_window=32)
    with pytest.raises(ValueError, match="no full-attention layer"):
        NAMMCache(model=model)


def test_unsupported_attention_implementation_is_refused():
    model = tiny_model("llama")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="eager or sdpa"):
        NAMMCache(model=model)


def test_layer_without_observations_fails_within_the_first_forward():
    model = tiny_model("llama", "sdpa")  # attention not routed through the wrapper
    cache = NAMMCache(model_config=model.config, scorer=random_scorer(0))
    with pytest.raises(RuntimeError, match="received no attention observation"):
        with torch.no_grad():
            model(input_ids=random_ids(8), cache=cache)


def test_crop_and_assisted_decoding_are_refused():
    model = tiny_model("llama")
    cache = NAMMCache(model=model)
    assert not cache.is_croppable
    assert not cache.is_compileable
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)
    assistant = tiny_model("llama", seed=5)
    ids = random_ids(20)
    with pytest.raises(Exception, match="cannot be cropped|not supported|crop"):
        model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, assistant_model=assistant, max_new_tokens=8, do_sample=False)


def test_torch_compile_is_refused():
    # Dynamo state left by earlier tests (guards on other caches' code) can make it fail elsewhere first.
    torch._dynamo.reset()
    model = tiny_model("llama")
    cache = NAMMCache(model=model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="torch.compile"):
        with torch.no_grad():
            compiled(input_ids=random_ids(8), cache=cache)


def test_reusing_a_cache_for_an_unrelated_prompt_raises_and_reset_fixes_it():
    model = tiny_model("llama")
    cache = NAMMCache(model=model, scorer=random_scorer(0), update_interval=16)
    first, second = random_ids(40, seed=1), random_ids(30, seed=2)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    model.generate(first, attention_mask=torch.ones_like(first), cache=cache, **kwargs)
    with pytest.raises(RuntimeError, match="cache.reset"):
        model.generate(second, attention_mask=torch.ones_like(second), cache=cache, **kwargs)
    cache.reset()
    fresh = NAMMCache(model=model, scorer=random_scorer(0), update_interval=16)
    again = model.generate(second, attention_mask=torch.ones_like(second), cache=cache, **kwargs)
    reference = model.generate(second, attention_mask=torch.ones_like(second), cache=fresh, **kwargs)
    assert torch.equal(again, reference)


def test_batch_size_change_is_refused():
    model = tiny_model("llama")
    cache = NAMMCache(model=model)
    with torch.no_grad():
        model(input_ids=random_ids(8, batch=2), cache=cache)
        with pytest.raises(ValueError, match="Batch size changed"):
            model(input_ids=random_ids(1, batch=1), cache=cache)


def test_cache_needs_a_model_or_config():
    with pytest.raises(ValueError, match="NAMMCache\\(model=model"):
        NAMMCache()


def test_config_object_and_overrides_combine():
    model = tiny_model("llama")
    cache = NAMMCache(model=model, config=NAMMConfig(update_interval=64), max_tokens=10)
    assert cache.namm_config.update_interval == 64 and cache.namm_config.max_tokens == 10
    assert isinstance(DynamicCache(config=model.config), DynamicCache)
