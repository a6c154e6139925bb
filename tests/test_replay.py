"""Replay fitness: the replayed eviction is the cache's own where features do not depend on earlier evictions,
and the batched answer pass scores each kept set as the cache would."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from conftest import random_ids, tiny_model

from namm_cache import BAMScorer, NAMMCache, NAMMConfig
from namm_cache.budgets import parse_budget
from namm_cache.evolution.fitness import answer_logprob
from namm_cache.evolution.replay import answer_scores, kept_fraction, record_prompt, replay_kept


def age_only_scorer(seed: int = 0) -> BAMScorer:
    """A random BAM scorer blind to the spectrogram: its scores depend on token ages only, which an eviction
    does not change, so a replay on full-cache features must reproduce the cache's evictions exactly."""
    scorer = BAMScorer()
    generator = torch.Generator().manual_seed(seed)
    scorer.set_flat_params(torch.randn(scorer.num_parameters(), generator=generator) * 0.5)
    recency = NAMMConfig().recency_dim
    with torch.no_grad():
        for linear in (scorer.query, scorer.key, scorer.value, scorer.readout):
            linear.weight[:, recency:] = 0  # inputs past the age embedding are the spectrogram bins
        scorer.gates.weight[recency:] = 0  # no gate feeds back into the bins
        scorer.gates.weight[scorer.input_dim + recency:] = 0
        scorer.readout.bias -= 5.0  # about the median score: the threshold then evicts
    return scorer


def cache_kept(model, prompt, scorer, config, chunk, budget=None) -> torch.Tensor:
    """`(L*H, tokens)` bool: what a real NAMMCache holds after `prompt`."""
    cache = NAMMCache(model=model, scorer=scorer, config=config, budget=budget)
    for part in prompt.split(chunk, dim=1):
        model(input_ids=part, cache=cache, use_cache=True)
    rows = []
    for layer in cache.namm_layers:
        held = torch.zeros(layer.keys.shape[1], prompt.shape[1], dtype=torch.bool)
        for head in range(layer.keys.shape[1]):
            held[head, layer.positions[0, head][layer.token_valid[0, head]]] = True
        rows.append(held)
    return torch.cat(rows)


@pytest.mark.parametrize("settings", [
    {"config": NAMMConfig(update_interval=32, threshold=0.0), "chunk": 32},
    {"config": NAMMConfig(update_interval=32, max_tokens=40), "chunk": 32},
    {"config": NAMMConfig(update_interval=32), "chunk": 20, "budget": 0.3},  # rounds fall inside chunks
    {"config": NAMMConfig(update_interval=32, max_tokens=40, sinks=3, recent_window=24), "chunk": 20},  # protected tokens
    {"config": NAMMConfig(update_interval=32, threshold=0.0, min_fraction=0.6, sinks=2), "chunk": 32},  # a floor
    {"config": NAMMConfig(update_interval=32, threshold=0.0, min_fraction=0.6), "chunk": 20},  # a floor, rounds inside chunks
    {"config": NAMMConfig(update_interval=32, threshold=0.0, neighbours=1), "chunk": 32},  # scores spread to neighbours
    {"config": NAMMConfig(update_interval=32, neighbours=3, sinks=2, recent_window=8), "chunk": 20, "budget": 0.3},
    {"config": NAMMConfig(update_interval=32, threshold=0.0, smoothing=2, neighbours=1), "chunk": 32},  # means, then spread
    {"config": NAMMConfig(update_interval=32, smoothing=3, sinks=2), "chunk": 20, "budget": 0.3},
])
def test_replay_evicts_exactly_what_the_cache_evicts_when_scores_do_not_read_attention(settings):
    model = tiny_model("llama")
    prompt, answer = random_ids(161), random_ids(3, seed=1)
    config, chunk = settings["config"], settings["chunk"]
    budget = parse_budget(settings.get("budget"))
    scorer = age_only_scorer()
    recording = record_prompt(model, prompt, answer, config, chunk)
    recording.prepare(scorer, config)
    replayed = replay_kept(recording, scorer, config, budget)
    real = cache_kept(model, prompt[:, :-1], age_only_scorer(), config, chunk, budget=settings.get("budget"))
    assert replayed.shape == real.shape == (4 * 2, 160)
    assert 0.1 < replayed.float().mean() < 0.9  # it evicts, and not everything
    assert torch.equal(replayed, real)
    if config.neighbours:  # the spreading changes what is kept
        assert not torch.equal(replay_kept(recording, scorer, config.replace(neighbours=0), budget), replayed)
    if config.smoothing:  # so does the averaging
        assert not torch.equal(replay_kept(recording, scorer, config.replace(smoothing=0), budget), replayed)
    if config.min_fraction is not None:  # the floor binds: without it the threshold alone keeps fewer
        unfloored = replay_kept(recording, scorer, config.replace(min_fraction=None), budget)
        assert replayed.sum() > unfloored.sum()
        assert replayed.sum(-1).min() >= math.ceil(0.6 * 160)  # the last round falls at 160 tokens


def test_replay_follows_the_scorer_and_a_cap_holds():
    model = tiny_model("llama")
    config = NAMMConfig(update_interval=32, max_tokens=24)
    recording = record_prompt(model, random_ids(200), random_ids(2, seed=3), config, 32)
    first, second = age_only_scorer(0), age_only_scorer(1)
    recording.prepare(first, config)
    a, b = replay_kept(recording, first, config), replay_kept(recording, second, config)
    assert not torch.equal(a, b)
    last_round = recording.rounds[-1].now
    assert (a[:, : last_round + 1].sum(-1) <= 24).all()  # the cap, at the last round
    assert a[:, last_round + 1:].all()  # tokens after the last round are all held


def test_answer_pass_scores_each_kept_set_like_the_cache():
    model = tiny_model("qwen3")
    config = NAMMConfig(update_interval=32)
    prompt, answer = random_ids(120), random_ids(4, seed=2)
    recording = record_prompt(model, prompt, answer, config, 32)
    rows, tokens = len(recording.cache.namm_layers) * recording.heads, recording.tokens
    everything = torch.ones(rows, tokens, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    sparse = torch.rand(rows, tokens, generator=generator) < 0.3
    sparse[:, -1] = True
    batched = answer_scores(model, recording, [everything, sparse, everything], config)
    alone = answer_scores(model, recording, [sparse], config)
    full_cache = math.exp(answer_logprob(model, NAMMCache(model=model, config=config, policy="full"), prompt, answer, 32))
    assert batched[0] == pytest.approx(full_cache, rel=1e-4)
    assert batched[2] == pytest.approx(batched[0], rel=1e-5)
    assert batched[1] == pytest.approx(alone[0], rel=1e-4)  # rows of a batch do not see each other
    assert abs(batched[1] - batched[0]) > 1e-4  # evicting 70% changes the answer's probability
    assert kept_fraction(sparse, 4) == pytest.approx((int(sparse.sum()) + rows * 4) / (rows * (tokens + 4)))


def test_a_hybrid_models_sliding_layers_travel_with_the_answer_cache():
    model = tiny_model("gemma3")
    config = NAMMConfig(update_interval=32)
    prompt, answer = random_ids(100), random_ids(3, seed=2)
    recording = record_prompt(model, prompt, answer, config, 32)
    rows = len(recording.cache.namm_layers) * recording.heads
    (score,) = answer_scores(model, recording, [torch.ones(rows, recording.tokens, dtype=torch.bool)], config)
    full_cache = math.exp(answer_logprob(model, NAMMCache(model=model, config=config, policy="full"), prompt, answer, 32))
    assert score == pytest.approx(full_cache, rel=1e-4)
    # Refeeding the last 70 tokens: the sliding layers restart from their state at the refeed's start.
    recording = record_prompt(model, prompt, answer, config, 32, refeed=70)
    assert recording.layers_at_refeed and all(layer.get_seq_length() <= 29 for layer in recording.layers_at_refeed.values())
    steps = torch.ones(len(recording.rounds) + 1, rows, recording.tokens, dtype=torch.bool)
    (score,) = answer_scores(model, recording, [steps], config)
    assert score == pytest.approx(full_cache, rel=1e-4)


def test_record_refuses_what_it_cannot_replay():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="one prompt"):
        record_prompt(model, random_ids(50, batch=2), random_ids(2), NAMMConfig(), 32)


def test_a_replay_run_matches_exact_scores_where_nothing_is_evicted_and_logs_validation(tmp_path, tiny_model_dir):
    from namm_cache.evolution.config import EvolutionConfig
    from namm_cache.evolution.run import EvolutionRun

    config = EvolutionConfig.from_dict({
        "model": str(tiny_model_dir), "scorer": {"kind": "bam", "hidden_dim": 8}, "namm": {"update_interval": 32},
        "population": 4, "sigma0": 0.3, "seed": 3, "prompts_per_task": 2, "calibration_prompts": 1, "threads": 1,
        "fitness": "replay", "validation_prompts_per_task": 2, "validation_every": 2,
        "stages": [{"tasks": [{"name": "passkey", "tokens": 150}], "generations": 3}],
    })
    run = EvolutionRun(config, tmp_path / "out", progress=False)
    examples = run.examples_for(0, 0)
    zero = np.zeros((1, run.dim))  # the zero scorer keeps every token: the replay is then exact
    replayed = run.replay_example(zero, examples[0], 0)
    exact_full = run.exact_score(None, examples[0], 0)
    exact_zero = run.exact_score(zero[0], examples[0], 0)
    assert replayed[0].tolist() == pytest.approx(exact_full.tolist(), rel=1e-4)
    assert replayed[1].tolist() == pytest.approx(exact_zero.tolist(), rel=1e-4)
    assert replayed[1, 1] == 1.0
    state = run.run()
    assert state.generation == 3
    assert [("validation" in row) for row in state.log] == [False, True, True]  # every 2nd, and the stage's last
    validation = state.log[1]["validation"]
    assert validation["prompts"] == 2 and 0 < validation["kept"] <= 1
    # The validation set is fixed and apart from the training draws.
    again = run.validation_examples(0)
    assert [e.prompt for e in again] == [e.prompt for e in run.validation_examples(0)]
    assert not {e.prompt for e in again} & {e.prompt for g in range(3) for e in run.examples_for(g, 0)}


def test_a_norm_reading_scorer_replays_like_the_cache_and_its_norm_inputs_matter():
    from namm_cache.scorers import BAMNormsScorer

    model = tiny_model("llama")
    config = NAMMConfig(update_interval=32, max_tokens=40)
    prompt, answer = random_ids(161), random_ids(3, seed=1)

    def norms_only(seed: int) -> BAMNormsScorer:
        """Reads age and norms, not the spectrogram: its replay must equal the cache exactly."""
        scorer = BAMNormsScorer()
        base = age_only_scorer(seed)
        generator = torch.Generator().manual_seed(seed + 100)
        scorer.set_flat_params(torch.randn(scorer.num_parameters(), generator=generator) * 0.5)
        recency, bins = config.recency_dim, config.n_bins
        with torch.no_grad():
            for linear in (scorer.query, scorer.key, scorer.value, scorer.readout):
                linear.weight[:, recency:recency + bins] = 0
            scorer.gates.weight[recency:recency + bins] = 0
            scorer.gates.weight[scorer.input_dim + recency:scorer.input_dim + recency + bins] = 0
        del base
        return scorer

    recording = record_prompt(model, prompt, answer, config, 32)
    scorer = norms_only(0)
    recording.prepare(scorer, config)
    replayed = replay_kept(recording, scorer, config)
    real = cache_kept(model, prompt[:, :-1], norms_only(0), config, 32)
    # Layer 0's keys and values come from the embeddings alone, so its norms, and its evictions, are the
    # cache's exactly; deeper layers' keys follow hidden states that evictions change a little (the replay's
    # approximation), so there the kept sets mostly agree.
    assert torch.equal(replayed[:2], real[:2])
    assert (replayed == real).float().mean() > 0.9
    blind = norms_only(0)
    with torch.no_grad():  # the same scorer with its norm inputs cut off keeps something else
        for linear in (blind.query, blind.key, blind.value, blind.readout):
            linear.weight[:, -2:] = 0
    assert not torch.equal(replay_kept(recording, blind, config), replayed)


@pytest.mark.parametrize("policy", ["full", "namm", "h2o"])
def test_one_prefill_scores_and_answers_like_two_separate_runs(policy, tiny_model_dir):
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import random_scorer
    from namm_cache import CacheSpec
    from namm_cache.evolution.fitness import evaluate_examples, generate_answer, score_and_answer
    from namm_cache.tasks import build_task, token_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = NAMMConfig(update_interval=32)
    spec = {"full": CacheSpec(policy="full", config=config),
            "namm": CacheSpec(scorer=random_scorer(seed=4), config=config, budget=0.3),
            "h2o": CacheSpec(policy="h2o", config=config, budget=0.3)}[policy]
    examples = [e for name in ("passkey", "needle") for e in build_task({"name": name, "tokens": 150}).sample(tokenizer, random.Random(5), 2)]
    for example in examples:
        together = score_and_answer(model, tokenizer, spec.build(model), example, 32, max_new_tokens=6)
        (alone,) = evaluate_examples(model, tokenizer, [example], lambda: spec.build(model), chunk=32)
        completion = generate_answer(model, tokenizer, spec.build(model), token_ids(tokenizer, example.prompt), 32, 6)
        assert together.score == pytest.approx(alone.score, rel=1e-4)
        assert together.kept_fraction == pytest.approx(alone.kept_fraction)
        assert together.completion == completion
        assert together.correct == example.is_correct(completion)


def test_validation_reports_baselines_at_the_stage_cap_once_per_stage(tmp_path, tiny_model_dir):
    from namm_cache.evolution.config import EvolutionConfig
    from namm_cache.evolution.run import EvolutionRun

    config = EvolutionConfig.from_dict({
        "model": str(tiny_model_dir), "scorer": {"kind": "bam", "hidden_dim": 8}, "namm": {"update_interval": 32, "max_tokens": 40},
        "population": 4, "seed": 3, "prompts_per_task": 1, "calibration_prompts": 1, "threads": 1, "fitness": "replay",
        "validation_prompts_per_task": 2, "validation_every": 1, "validation_baselines": ["h2o", "streaming_llm"],
        "stages": [{"tasks": [{"name": "passkey", "tokens": 150}], "generations": 2}],
    })
    run = EvolutionRun(config, tmp_path / "out", progress=False)
    calls = []
    exact_scores = run.exact_scores
    run.exact_scores = lambda member, *rest: calls.append(member if isinstance(member, str) else "full" if member is None else "member") or exact_scores(member, *rest)
    state = run.run()
    first, second = (row["validation"] for row in state.log)
    assert set(first["baselines"]) == {"h2o", "streaming_llm"}
    assert first["baselines"] == second["baselines"]
    assert sorted(calls) == ["full", "h2o", "member", "member", "streaming_llm"]  # full and baselines once per stage
    for baseline in first["baselines"].values():
        assert baseline["budget_tokens"] == 40 and 0 < baseline["kept"] < 1
    assert first["baselines"]["h2o"]["quality"] != first["baselines"]["streaming_llm"]["quality"]
    assert (tmp_path / "out" / "fitness.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="validation_baselines"):
        EvolutionConfig.from_dict({**config.to_dict(), "stages": [{"tasks": [{"name": "passkey", "tokens": 150}], "generations": 1}],
                                   "validation_baselines": ["h20"]})
    # A scorer's protected tokens are not the baselines': they run their own rule at the cap.
    run.config.namm.update(sinks=4, recent_window=16, neighbours=2, smoothing=3)
    baseline, member = run.make_cache("streaming_llm", 0)(), run.make_cache(np.zeros(run.dim), 0)()
    fields = ("sinks", "recent_window", "neighbours", "smoothing")
    assert tuple(getattr(baseline.namm_config, name) for name in fields) == (0, 0, 0, 0)
    assert tuple(getattr(member.namm_config, name) for name in fields) == (4, 16, 2, 3)
    with pytest.raises(ValueError, match="fitness: replay only"):
        EvolutionConfig.from_dict({**config.to_dict(), "fitness": "exact", "replay_refeed": 64})


def test_validation_baselines_run_at_the_runs_fraction_budget_in_a_stage_without_a_cap(tmp_path, tiny_model_dir):
    """A stage with no cap and a fraction budget: baselines face the members' budget, not no budget (which
    would skip them) and not the full cache."""
    from namm_cache.budgets import FractionBudget
    from namm_cache.evolution.config import EvolutionConfig
    from namm_cache.evolution.run import EvolutionRun

    settings = {
        "model": str(tiny_model_dir), "scorer": {"kind": "bam", "hidden_dim": 8}, "namm": {"update_interval": 32},
        "budget": 0.3, "population": 4, "seed": 3, "prompts_per_task": 1, "calibration_prompts": 1, "threads": 1,
        "fitness": "replay", "validation_prompts_per_task": 2, "validation_every": 1, "validation_baselines": ["h2o"],
        "stages": [{"tasks": [{"name": "passkey", "tokens": 150}], "generations": 1}],
    }
    run = EvolutionRun(EvolutionConfig.from_dict(settings), tmp_path / "out", progress=False)
    assert run.baseline_budget(0) == FractionBudget(0.3)
    assert run.make_cache("h2o", 0)().budget == FractionBudget(0.3)
    (row,) = run.run().log
    h2o, member_kept = row["validation"]["baselines"]["h2o"], row["validation"]["kept"]
    assert h2o["budget_fraction"] == 0.3 and "budget_tokens" not in h2o
    assert 0.3 <= h2o["kept"] < 0.6 and h2o["kept"] == pytest.approx(member_kept, abs=0.05)  # the same rule's memory
    threshold = EvolutionRun(EvolutionConfig.from_dict({**settings, "budget": "threshold"}), tmp_path / "t", progress=False)
    assert threshold.baseline_budget(0) is None
    # A cap as well: it clamps the fraction for members and baselines alike (min(30% of seen, 40 tokens)).
    capped = EvolutionRun(EvolutionConfig.from_dict({**settings, "namm": {"update_interval": 32, "max_tokens": 40}}),
                          tmp_path / "c", progress=False)
    baseline, member = capped.make_cache("h2o", 0)(), capped.make_cache(np.zeros(capped.dim), 0)()
    assert baseline.budget == member.budget == FractionBudget(0.3)
    assert baseline.namm_config.max_tokens == member.namm_config.max_tokens == 40
    (row,) = capped.run().log
    h2o = row["validation"]["baselines"]["h2o"]
    assert (h2o["budget_fraction"], h2o["budget_tokens"]) == (0.3, 40)
    assert h2o["kept"] == pytest.approx(row["validation"]["kept"], abs=0.02)


@pytest.mark.parametrize("interval, refeed", [(128, 20), (32, 110)])
def test_refeeding_the_prompts_end_scores_what_the_real_cache_scores(interval, refeed):
    """Every round falls among the refed tokens (one at 128 tokens seen; four, every 32): the refeed runs
    them in the member's answer cache where they fall, as the real cache does, so the replayed answer equals
    the real one. Recorded instead (refeed 0), the prompt's end reads evicted tokens."""
    model = tiny_model("llama")
    config = NAMMConfig(update_interval=interval, threshold=0.0)
    prompt, answer = random_ids(140, seed=4), random_ids(4, seed=5)
    scorer = age_only_scorer()
    real = math.exp(answer_logprob(model, NAMMCache(model=model, scorer=age_only_scorer(), config=config), prompt, answer, 32))
    full = math.exp(answer_logprob(model, NAMMCache(model=model, config=config, policy="full"), prompt, answer, 32))
    scores = {}
    for fed_again in (0, refeed):
        recording = record_prompt(model, prompt, answer, config, 32, refeed=fed_again)
        assert recording.tokens == 139 and recording.refeed_start == 139 - fed_again
        assert [r.now for r in recording.rounds] == list(range(interval - 1, 128, interval))
        recording.prepare(scorer, config)
        steps = replay_kept(recording, scorer, config, steps=True)
        assert steps.shape == (len(recording.rounds) + 1, 8, 139) and steps[0].all()
        assert torch.equal(steps[-1], replay_kept(recording, scorer, config))
        assert 0.2 < steps[-1][:, :128].float().mean() < 0.9
        scores[fed_again] = answer_scores(model, recording, [steps, torch.ones_like(steps)], config)
    assert scores[refeed][0] == pytest.approx(real, rel=2e-5)
    assert scores[refeed][1] == pytest.approx(full, rel=2e-5)
    # Recorded with every token in view, the end reads evicted ones (a random model: a small but real shift).
    assert abs(scores[0][0] - real) > 2e-4 * real
    with pytest.raises(ValueError, match="refeed must be in"):
        record_prompt(model, prompt, answer, config, 32, refeed=139)
    with pytest.raises(ValueError, match="steps=True"):
        answer_scores(model, recording, [steps[-1]], config)
