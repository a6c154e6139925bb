"""The distilled warm start: targets from the answer's attention, inputs as the scorer sees them, a fit that learns."""

from __future__ import annotations

import torch
from conftest import random_ids, tiny_model

from namm_cache.evolution.distill import Round, collect_rounds, fit_scorer, positives
from namm_cache import BAMScorer, NAMMConfig


def test_rounds_hold_what_the_scorer_sees_and_the_answers_attention():
    model = tiny_model("qwen3", "sdpa")
    config = NAMMConfig(update_interval=32)
    rounds = collect_rounds(model, random_ids(130), random_ids(3, seed=1), config, chunk=32)
    # Rounds at 32, 64, 96 and 128 tokens seen (the last when the final 2-token chunk arrives) x 4 layers.
    assert len(rounds) == 16
    for r in rounds:
        heads, slots = r.valid.shape
        assert heads == 2 and r.spectrogram.shape == (heads, slots, 17) and r.target.shape == (heads, slots)
        assert torch.equal(r.age[r.valid], (r.positions[r.valid].max() - r.positions[r.valid]))
        assert (r.target >= 0).all() and (r.target <= 1).all()
    # The target of a token is the same in every round that holds it (the answer's attention, fixed).
    first, later = rounds[0], rounds[-4]
    assert torch.allclose(first.target[:, :10], later.target[:, :10])


def test_positives_are_each_rows_top_fraction():
    target = torch.tensor([[0.1, 0.9, 0.3, 0.5, 0.0, 0.2, 0.8, 0.4]])
    valid = torch.tensor([[True, True, True, True, True, True, False, True]])
    round_ = Round(torch.zeros(1, 8, 17), torch.zeros(1, 8), torch.arange(8).view(1, 8), valid, target)
    assert positives(round_, 0.25).tolist() == [[False, True, False, True, False, False, False, False]]  # 7 valid -> 2


def test_fit_learns_a_target_its_features_carry_and_keeps_the_asked_fraction():
    generator = torch.Generator().manual_seed(0)
    rounds = []
    for _ in range(12):
        spectrogram = torch.rand(2, 40, 17, generator=generator)
        positions = torch.arange(40).expand(2, 40)
        valid = torch.rand(2, 40, generator=generator) > 0.1
        # Importance is the spectrogram's first bin: learnable from the features alone.
        rounds.append(Round(spectrogram, 39 - positions, positions, valid, spectrogram[..., 0]))
    scorer = BAMScorer()
    report = fit_scorer(scorer, rounds, NAMMConfig(), keep_fraction=0.25, steps=150, progress=False)
    assert abs(report["kept_fraction"] - 0.25) < 0.02
    assert report["precision"] > 0.8  # chance is 0.25
    assert scorer.constant_score() is None  # a real scorer: the cache will observe attention for it


def test_command_line_writes_a_loadable_scorer_and_refuses_bad_input(tmp_path, tiny_model_dir, capsys):
    from namm_cache.evolution.distill import main
    from namm_cache.hub import load_scorer

    out = tmp_path / "warm"
    args = ["--out", str(out), "--model", str(tiny_model_dir), "--tokens", "300", "--prompts-per-task", "1",
            "--update-interval", "64", "--steps", "5"]
    assert main(args) == 0
    loaded = load_scorer(str(out))
    assert loaded.config.update_interval == 64
    assert loaded.metadata.training_tasks == ["passkey", "needle"]
    assert 0.2 <= loaded.metadata.extra["distill"]["kept_fraction"] <= 0.3
    assert loaded.scorer.constant_score() is None
    for bad in (["--keep-fraction", "1.5"], ["--steps", "0"], ["--tasks", "nonsense"]):
        assert main([*args[2:], "--out", str(tmp_path / "other"), *bad]) == 2
        assert "error:" in capsys.readouterr().err
    assert main(args) == 2  # the folder is not empty: never overwritten
    assert "not empty" in capsys.readouterr().err
    protected = tmp_path / "protected"
    assert main([*args[2:], "--out", str(protected), "--kind", "linear", "--sinks", "4", "--recent-window", "32"]) == 0
    loaded = load_scorer(str(protected))
    assert (loaded.config.sinks, loaded.config.recent_window, loaded.scorer.kind) == (4, 32, "linear")
    assert "4 sinks and 32 recent tokens protected" in loaded.metadata.description
    assert main([*args[2:], "--out", str(tmp_path / "bad"), "--sinks", "-1"]) == 2
    assert "sinks" in capsys.readouterr().err


def test_a_norm_reading_scorer_learns_a_target_only_the_norms_carry():
    from namm_cache.scorers import BAMNormsScorer

    generator = torch.Generator().manual_seed(0)
    rounds = []
    for _ in range(12):
        positions = torch.arange(40).expand(2, 40)
        norms = torch.randn(2, 40, 2, generator=generator)
        # Importance is the key norm: the spectrogram (noise) cannot predict it, the norm input can.
        rounds.append(Round(torch.rand(2, 40, 17, generator=generator), 39 - positions, positions,
                            torch.ones(2, 40, dtype=torch.bool), norms[..., 0], log_norms=norms))
    paper = fit_scorer(BAMScorer(), rounds, NAMMConfig(), keep_fraction=0.25, steps=150, progress=False)
    norms = fit_scorer(BAMNormsScorer(), rounds, NAMMConfig(), keep_fraction=0.25, steps=150, progress=False)
    assert norms["precision"] > 0.8 > paper["precision"] + 0.2


def test_a_recency_prior_ranks_newer_tokens_higher_and_keeps_the_asked_fraction():
    from namm_cache.evolution.distill import add_recency_prior
    from namm_cache.features import token_features

    config = NAMMConfig()
    scorer = BAMScorer()
    assert add_recency_prior(scorer, 1.0, config) == 3
    age = torch.arange(2000).flip(0).view(1, -1)
    features = token_features(torch.zeros(1, 2000, 17), age, scorer.spectrogram_mean, scorer.spectrogram_std, config)
    scores = scorer(features, torch.arange(2000).view(1, -1), torch.ones(1, 2000, dtype=torch.bool))[0]
    assert (scores[1:] > scores[:-1]).all()  # newer (higher position) scores higher throughout 2k tokens
    generator = torch.Generator().manual_seed(0)
    rounds = [Round(torch.rand(2, 40, 17, generator=generator), 39 - torch.arange(40).expand(2, 40), torch.arange(40).expand(2, 40),
                    torch.ones(2, 40, dtype=torch.bool), torch.rand(2, 40, generator=generator)) for _ in range(6)]
    report = fit_scorer(BAMScorer(), rounds, config, keep_fraction=0.25, steps=20, progress=False, recency_weight=30.0)
    assert abs(report["kept_fraction"] - 0.25) < 0.02


def test_protected_tokens_are_left_out_of_the_fit():
    """With sinks and a recent window the scorer decides only the other tokens: the asked fraction is of those,
    and a target that marks only protected tokens leaves nothing to learn beyond chance."""
    generator = torch.Generator().manual_seed(0)
    config = NAMMConfig(sinks=4, recent_window=10)
    rounds = []
    for _ in range(12):
        spectrogram = torch.rand(2, 40, 17, generator=generator)
        positions = torch.arange(40).expand(2, 40)
        target = spectrogram[..., 0].clone()
        target[:, :4] += 10.0  # the sinks and recent tokens matter most, but the cache keeps them anyway
        target[:, 30:] += 10.0
        rounds.append(Round(spectrogram, 39 - positions, positions, torch.ones(2, 40, dtype=torch.bool), target))
    scorer = BAMScorer()
    report = fit_scorer(scorer, rounds, config, keep_fraction=0.25, steps=150, progress=False)
    assert abs(report["kept_fraction"] - 0.25) < 0.03  # of the 26 decided tokens per row, not of all 40
    from namm_cache.evolution.distill import scorer_inputs

    with torch.no_grad():
        kept = torch.cat([(scorer(scorer_inputs(scorer, r, config), r.positions, r.valid) >= 0)[:, 4:30] for r in rounds])
    assert abs(kept.float().mean().item() - 0.25) < 0.03  # measured on the decided tokens themselves
    assert report["precision"] > 0.8  # the first bin ranks the decided tokens
    everything = [Round(r.spectrogram[:, :12], r.age[:, :12] - 28, r.positions[:, :12], r.valid[:, :12], r.target[:, :12]) for r in rounds]
    import pytest
    with pytest.raises(ValueError, match="nothing is left"):
        fit_scorer(BAMScorer(), everything, NAMMConfig(sinks=4, recent_window=12), steps=1, progress=False)
