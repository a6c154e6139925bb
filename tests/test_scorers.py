"""Scorers: sizes, zero-init behaviour, the backward mask, flat parameters."""

from __future__ import annotations

import pytest
import torch

from namm_cache import BAMScorer, MLPScorer, attention_mass_scorer
from namm_cache.scorers import build_scorer


def test_bam_has_the_papers_parameter_count():
    assert BAMScorer().num_parameters() == 4172
    assert BAMScorer(input_dim=25, hidden_dim=32).get_flat_params().shape == (4172,)


@pytest.mark.parametrize("scorer_class", [BAMScorer, MLPScorer])
def test_zero_init_scores_zero_everywhere(scorer_class):
    scorer = scorer_class()
    features = torch.randn(3, 11, 25)
    positions = torch.arange(11).expand(3, 11)
    scores = scorer(features, positions, torch.ones(3, 11, dtype=torch.bool))
    assert scores.shape == (3, 11)
    assert torch.count_nonzero(scores) == 0
    assert scorer.constant_score() == 0.0


def test_bam_is_backward_masked():
    """A token's score depends on itself and newer tokens only, and never on empty slots."""
    torch.manual_seed(0)
    scorer = BAMScorer()
    scorer.set_flat_params(torch.randn(scorer.num_parameters()) * 0.5)
    assert scorer.constant_score() is None
    features = torch.randn(1, 10, 25)
    positions = torch.arange(10).unsqueeze(0)
    valid = torch.ones(1, 10, dtype=torch.bool)
    base = scorer(features, positions, valid)
    changed = features.clone()
    changed[0, 2] += 5.0  # an older token
    after = scorer(changed, positions, valid)
    torch.testing.assert_close(after[0, 3:], base[0, 3:])
    assert not torch.allclose(after[0, :3], base[0, :3])
    # An invalid slot's content does not matter to anyone else.
    valid_with_hole = valid.clone()
    valid_with_hole[0, 7] = False
    reference = scorer(features, positions, valid_with_hole)
    noisy = features.clone()
    noisy[0, 7] = 100.0
    torch.testing.assert_close(scorer(noisy, positions, valid_with_hole)[0, valid_with_hole[0]], reference[0, valid_with_hole[0]])


def test_flat_params_round_trip_and_validation():
    scorer = MLPScorer()
    vector = torch.randn(scorer.num_parameters())
    scorer.set_flat_params(vector)
    torch.testing.assert_close(scorer.get_flat_params(), vector)
    with pytest.raises(ValueError, match="2508 parameters"):
        scorer.set_flat_params(torch.zeros(7))
    bad = vector.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        scorer.set_flat_params(bad)


def test_wrong_feature_width_is_refused():
    with pytest.raises(ValueError, match="reads 25 features"):
        BAMScorer()(torch.randn(1, 4, 24), torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool))


def test_normalisation_statistics_validation():
    scorer = BAMScorer()
    with pytest.raises(ValueError, match="shape"):
        scorer.set_normalization(torch.zeros(16), torch.ones(16))
    with pytest.raises(ValueError, match="std > 0"):
        scorer.set_normalization(torch.zeros(17), torch.zeros(17))


def test_attention_mass_scorer_ranks_by_first_bin():
    scorer = attention_mass_scorer(weight=2.0, bias=-1.0)
    features = torch.zeros(1, 3, 25)
    features[0, :, 8] = torch.tensor([0.0, 0.5, 2.0])
    scores = scorer(features, torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(scores, torch.tensor([[-1.0, 0.0, 3.0]]))


def test_build_scorer_from_config_dict():
    scorer = build_scorer(**BAMScorer(hidden_dim=16).config_dict())
    assert isinstance(scorer, BAMScorer) and scorer.hidden_dim == 16
    with pytest.raises(ValueError, match="Unknown scorer kind"):
        build_scorer("transformer")


def test_a_norm_reading_scorer_serves_a_cache_and_round_trips_through_save_and_load(tmp_path):
    from conftest import random_ids, tiny_model

    from namm_cache import NAMMCache, NAMMConfig
    from namm_cache.features import norm_features
    from namm_cache.scorers import BAMNormsScorer

    scorer = BAMNormsScorer()
    assert scorer.input_dim == NAMMConfig().feature_dim + 2 == 27
    torch.manual_seed(0)
    scorer.set_flat_params(torch.randn(scorer.num_parameters()) * 0.3)
    model = tiny_model("llama")
    cache = NAMMCache(model=model, scorer=scorer, config=NAMMConfig(update_interval=32, max_tokens=24))
    model(input_ids=random_ids(100), cache=cache, use_cache=True)
    assert cache.stats()["evicted_tokens"] > 0
    cache.save_pretrained(tmp_path / "norms")
    loaded = NAMMCache.from_pretrained(tmp_path / "norms", model=model)
    assert loaded.scorer.kind == "bam_norms"
    torch.testing.assert_close(loaded.scorer.get_flat_params(), scorer.get_flat_params())
    with pytest.raises(ValueError, match="input_dim=27"):
        NAMMCache(model=model, scorer=BAMNormsScorer(input_dim=25))
    # The norm features: z-scored within each row over its valid tokens, zero elsewhere.
    keys, values = torch.randn(2, 6, 8) * 5, torch.randn(2, 6, 8)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    features = norm_features(keys, values, valid)
    assert features.shape == (2, 6, 2)
    torch.testing.assert_close(features[valid.unsqueeze(-1).expand_as(features)].view(-1, 2)[:6].mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    assert (features[1, 4:] == 0).all()
    torch.testing.assert_close(norm_features(keys * 10, values, valid)[..., 0], features[..., 0])  # scale-free per row


def test_the_linear_scorer_is_a_weighted_sum_and_keeps_what_its_weights_ask_for(tmp_path):
    from conftest import random_ids, tiny_model

    from namm_cache import NAMMCache, NAMMConfig
    from namm_cache.scorers import LinearScorer

    scorer = LinearScorer()
    assert scorer.num_parameters() == 28 and scorer.input_dim == NAMMConfig().feature_dim + 2
    torch.manual_seed(0)
    scorer.set_flat_params(torch.randn(28))
    features, positions = torch.randn(2, 9, 27), torch.arange(9).expand(2, 9)
    weight, bias = scorer.readout.weight[0], scorer.readout.bias[0]
    torch.testing.assert_close(scorer(features, positions, torch.ones(2, 9, dtype=torch.bool)), features @ weight + bias)
    # Only the key-norm input weighted (negatively): under a cap each head keeps its lowest-norm keys.
    scorer.set_flat_params(torch.zeros(28))
    with torch.no_grad():
        scorer.readout.weight[0, 25] = -1.0
        scorer.readout.bias.fill_(100.0)
    model = tiny_model("llama")
    cache = NAMMCache(model=model, scorer=scorer, config=NAMMConfig(update_interval=32, max_tokens=20))
    model(input_ids=random_ids(64), cache=cache, use_cache=True)
    # The last layer (the first one's keys tie for repeated token ids). The last round ran at 32 tokens seen:
    # 20 kept of the first 32, then the 32 tokens since.
    layer = cache.namm_layers[-1]
    full = NAMMCache(model=model, policy="full")
    model(input_ids=random_ids(64), cache=full, use_cache=True)
    norms = full.layers[layer.layer_idx].keys[0, :, :32].float().norm(dim=-1)  # (heads, 32)
    for head in range(norms.shape[0]):
        held = layer.positions[0, head][layer.token_valid[0, head]]
        older = held[held < 32]
        expected = set(norms[head, :31].argsort()[:19].tolist()) | {31}  # the newest is always kept
        assert set(older.tolist()) == expected
    cache.save_pretrained(tmp_path / "linear")
    loaded = NAMMCache.from_pretrained(tmp_path / "linear", model=model)
    assert loaded.scorer.kind == "linear"
    torch.testing.assert_close(loaded.scorer.get_flat_params(), scorer.get_flat_params())
