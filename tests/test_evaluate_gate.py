"""The held-out gate: paired bootstrap of NAMM vs the best baseline, the oracle ceiling, the CLI's flag checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_ids, tiny_model

from namm_cache import CacheSpec, NAMMConfig
from namm_cache.evolution.evaluate import depth_table, main, paired_bootstrap, table
from namm_cache.policies import BASELINE_POLICIES, POLICIES, OraclePolicy, build_policy

TASKS = ("passkey", "needle", "long_text")


def scores(prompts: int, seed: int = 0, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Per-prompt scores in (0, 1) per task, a task-dependent level plus prompt-to-prompt noise."""
    rng = np.random.default_rng(seed)
    return {task: np.clip(0.3 + 0.1 * i + 0.15 * rng.standard_normal(prompts), 0.01, 1.0) + shift for i, task in enumerate(TASKS)}


def normalised(namm, full):
    return np.mean([namm[t].mean() / full[t].mean() for t in namm])


def test_identical_rows_give_a_zero_interval_and_ratio_one():
    full, baseline = scores(30, seed=1), scores(30, seed=2)
    gate = paired_bootstrap({t: v.copy() for t, v in baseline.items()}, baseline, full, resamples=500, seed=0)
    assert gate["difference"] == gate["low"] == gate["high"] == 0.0
    assert gate["ratio"] == pytest.approx(1.0) and gate["ratio_low"] == pytest.approx(1.0) and gate["ratio_high"] == pytest.approx(1.0)


def test_a_constant_shift_gives_an_interval_excluding_zero_around_the_point_estimate():
    full, baseline = scores(30, seed=1), scores(30, seed=2)
    namm = {t: v + 0.1 for t, v in baseline.items()}
    gate = paired_bootstrap(namm, baseline, full, resamples=2000, seed=0)
    expected = normalised(namm, full) - normalised(baseline, full)
    assert gate["difference"] == pytest.approx(expected)
    assert 0 < gate["low"] < gate["difference"] < gate["high"]
    assert gate["ratio"] == pytest.approx(normalised(namm, full) / normalised(baseline, full))
    assert 1 < gate["ratio_low"] < gate["ratio"] < gate["ratio_high"]
    # The same shift, negative: the interval lies below zero.
    worse = paired_bootstrap(baseline, namm, full, resamples=2000, seed=0)
    assert worse["low"] < worse["high"] < 0


def test_the_interval_narrows_with_more_prompts():
    def width(prompts):
        full, namm, baseline = scores(prompts, 1), scores(prompts, 2), scores(prompts, 3)
        gate = paired_bootstrap(namm, baseline, full, resamples=2000, seed=0)
        return gate["high"] - gate["low"]

    assert width(200) < 0.6 * width(20)


def test_the_bootstrap_is_deterministic_for_a_seed():
    full, namm, baseline = scores(30, 1), scores(30, 2), scores(30, 3)
    first = paired_bootstrap(namm, baseline, full, resamples=1000, seed=7)
    assert paired_bootstrap(namm, baseline, full, resamples=1000, seed=7) == first
    other = paired_bootstrap(namm, baseline, full, resamples=1000, seed=8)
    assert other["difference"] == first["difference"] and (other["low"], other["high"]) != (first["low"], first["high"])


@pytest.mark.parametrize("break_it", ["namm_shorter", "baseline_longer", "full_shorter", "missing_task", "empty", "two_dim", "nan"])
def test_the_bootstrap_refuses_unpaired_scores(break_it):
    full, namm, baseline = scores(10, 1), scores(10, 2), scores(10, 3)
    if break_it == "namm_shorter":
        namm["needle"] = namm["needle"][:-1]
    elif break_it == "baseline_longer":
        baseline["passkey"] = np.append(baseline["passkey"], 0.5)
    elif break_it == "full_shorter":
        full["long_text"] = full["long_text"][:5]
    elif break_it == "missing_task":
        del baseline["needle"]
    elif break_it == "empty":
        namm, baseline, full = ({t: np.zeros(0) for t in TASKS} for _ in range(3))
    elif break_it == "two_dim":
        namm["needle"] = namm["needle"].reshape(2, 5)
    else:
        namm["needle"][3] = np.nan
    with pytest.raises(ValueError):
        paired_bootstrap(namm, baseline, full, resamples=100, seed=0)


def test_the_bootstrap_refuses_bad_settings():
    full = scores(5, 1)
    for settings in ({"resamples": 0}, {"seed": -1}, {"resamples": 1.5}, {"confidence": 1.0}):
        with pytest.raises(ValueError):
            paired_bootstrap(full, full, full, **settings)


# ---------------------------------------------------------------------------------------------- oracle


def kept_sets(cache) -> list[set[int]]:
    return [set(layer.positions[0, h][layer.token_valid[0, h]].tolist())
            for layer in cache.namm_layers for h in range(layer.keys.shape[1])]


def test_the_oracle_keeps_exactly_the_evidence_the_sinks_and_the_most_recent_tokens():
    model = tiny_model("llama")
    evidence = [40, 41, 42, 70, 71]
    spec = CacheSpec(policy="oracle", policy_kwargs={"positions": evidence}, budget=0.25, overrides={"update_interval": 32})
    cache = spec.build(model)
    ids = random_ids(129)
    with torch.no_grad():
        for chunk in ids[:, :128].split(32, dim=1):
            model(input_ids=chunk, cache=cache)
        model(input_ids=ids[:, 128:], cache=cache)  # runs the eviction round at 128 tokens seen
    budget = 32  # ceil(0.25 x 128)
    protected = set(evidence) | {0, 1, 2, 3}
    recent = set(range(128 - (budget - len(protected)), 128))
    expected = protected | recent | {128}
    for kept in kept_sets(cache):
        assert kept == expected
    assert "oracle" not in BASELINE_POLICIES and POLICIES["oracle"] is OraclePolicy


def test_the_oracle_differs_from_streaming_llm_only_by_the_evidence():
    model = tiny_model("llama")
    ids = random_ids(129)

    def run(spec):
        cache = spec.build(model)
        with torch.no_grad():
            for chunk in ids.split(32, dim=1):
                model(input_ids=chunk, cache=cache)
        return kept_sets(cache)

    config = NAMMConfig(update_interval=32)
    oracle = run(CacheSpec(policy="oracle", policy_kwargs={"positions": [50, 51]}, budget=40, config=config))
    streaming = run(CacheSpec(policy="streaming_llm", budget=40, config=config))
    for mine, theirs in zip(oracle, streaming):
        assert {50, 51} <= mine and not {50, 51} & theirs
        assert len(mine) == len(theirs) and len(theirs - mine) == 2  # two recent tokens made room for the evidence


def test_the_oracle_ranks_evidence_above_sinks_above_recency():
    from namm_cache.policies import Observation

    positions = torch.arange(100).unsqueeze(0)
    observation = Observation(0, torch.zeros(1, 100, 4), positions, torch.ones(1, 100, dtype=torch.bool),
                              99 - positions, NAMMConfig())
    score = OraclePolicy(positions=(60, 61, 20)).score(observation)[0]
    evidence, sinks, rest = score[[20, 60, 61]], score[:4], score[torch.tensor([i for i in range(100) if i > 3 and i not in (20, 60, 61)])]
    assert evidence.min() > sinks.max() and sinks.min() > rest.max()
    assert torch.equal(rest.argsort(), torch.arange(rest.numel()))  # the rest by recency: the newest highest
    assert OraclePolicy(positions=[61, 60, 20, 60]).positions == (20, 60, 61)


@pytest.mark.parametrize("kwargs", [{}, {"positions": []}, {"positions": [-1, 3]}, {"positions": [1.5]}, {"positions": "12"},
                                    {"positions": [True]}, {"positions": None}, {"positions": [1], "sinks": -1},
                                    {"positions": [1], "window": 3}])
def test_the_oracle_refuses_bad_arguments_with_one_value_error(kwargs):
    with pytest.raises(ValueError) as error:
        build_policy("oracle", **kwargs)
    assert "\n" not in str(error.value)


def test_the_oracle_refuses_a_threshold_budget():
    with pytest.raises(ValueError, match="threshold"):
        CacheSpec(policy="oracle", policy_kwargs={"positions": [3]}).build(tiny_model("llama"))


def test_haystack_examples_carry_their_needles_as_evidence(tiny_model_dir):
    from transformers import AutoTokenizer

    from namm_cache.tasks import heldout_examples, token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = heldout_examples(tokenizer, 1, tokens=300)
    for example in examples:
        if example.task == "long_text":
            assert example.evidence is None
            continue
        spans = example.evidence
        assert spans and all(example.prompt[a:b].startswith(("The pass key", "The special magic", "VAR")) for a, b in spans)
        positions = example.evidence_positions(tokenizer)
        ids = token_ids(tokenizer, example.prompt)[0]
        text = tokenizer.decode(ids[positions])
        for a, b in spans:
            assert example.prompt[a:b].replace(" ", "") in text.replace(" ", "")
        # Only evidence tokens: the tokens just outside are not evidence.
        assert positions[0] > 0 and positions[-1] < len(ids) - 1
        assert len(positions) < 30 * len(spans)


# ---------------------------------------------------------------------------------------------- evaluation and CLI


def test_heldout_evaluation_keeps_per_prompt_scores_and_gates_against_the_best_baseline(tmp_path, tiny_model_dir):
    from helpers import random_scorer

    from namm_cache.evolution.evaluate import evaluate_heldout
    from namm_cache.evolution.run import load_model
    from namm_cache.hub import ScorerMetadata, save_scorer

    folder = tmp_path / "scorer"
    save_scorer(folder, random_scorer(seed=3), NAMMConfig(update_interval=128, threshold=0.0, max_tokens=64, sinks=4,
                                                          recent_window=16), ScorerMetadata(description="test scorer"))
    model, tokenizer = load_model(str(tiny_model_dir))
    result = evaluate_heldout(model, tokenizer, str(folder), prompts_per_task=2, policies=["h2o", "streaming_llm"],
                              protected_policies=["h2o"], progress=False, budget=0.25, resamples=300)
    labels = [row["label"] for row in result["rows"]]
    assert labels[1] == "NAMM (budget 25%)" and labels[-1].startswith("oracle (ceiling, budget ")
    namm, oracle = result["rows"][1], result["rows"][-1]
    assert 0.2 < namm["kept_fraction"] < 0.4 and abs(oracle["kept_fraction"] - namm["kept_fraction"]) < 0.02
    # h2o again, told to keep the scorer's 4 sinks and 16 newest positions inside the same budget
    plain, protected = (next(row for row in result["rows"] if row["policy"] == name) for name in ("h2o", "h2o+protected"))
    assert protected["label"].startswith("h2o + 4 sinks, 16 recent (budget ")
    assert abs(protected["kept_fraction"] - plain["kept_fraction"]) < 0.02
    assert protected["protected"] == {"sinks": 4, "recent_window": 16} and "protected" not in plain
    for row in result["rows"][:-1]:
        assert {task: len(values) for task, values in row["scores"].items()} == {
            "passkey": 2, "needle": 2, "variable_tracking": 2, "long_text": 2}
        for task, values in row["scores"].items():
            assert row["per_task"][task]["score"] == pytest.approx(sum(values) / 2)
    assert set(oracle["scores"]) == {"passkey", "needle", "variable_tracking"}  # long_text carries no evidence
    gate = result["gate"]
    baselines = [row for row in result["rows"] if row["policy"] in ("h2o", "streaming_llm", "h2o+protected")]
    best = max(baselines, key=lambda row: row["normalized_mean"])
    assert gate["baseline"] == best["policy"] and gate["resamples"] == 300
    assert gate["difference"] == pytest.approx(namm["normalized_mean"] - best["normalized_mean"])
    assert gate["low"] <= gate["difference"] <= gate["high"]
    text = table(result)
    assert f"NAMM \u2212 best baseline ({best['policy']}): {gate['difference']:+.3f}" in text
    assert "over 2 prompts/task" in text and "\u2013" in text  # the oracle's long_text cell is empty
    assert set(result["depths"]) == {"passkey", "needle"}
    for task, depths in result["depths"].items():
        assert len(depths) == 2 and all(0.0 < depth < 1.0 for depth in depths)
    for row in result["rows"]:
        assert {task: len(answers) for task, answers in row["correct"].items()} == (
            {"passkey": 2, "needle": 2, "variable_tracking": 2})
        assert all(isinstance(answer, bool) for answers in row["correct"].values() for answer in answers)
    assert "Greedy answers correct by needle depth" in text


def test_the_scorers_neighbours_reach_its_protected_baselines_and_not_the_published_ones(tmp_path, tiny_model_dir):
    from helpers import random_scorer

    from namm_cache.evolution.evaluate import evaluate_heldout
    from namm_cache.evolution.run import load_model
    from namm_cache.hub import ScorerMetadata, save_scorer

    model, tokenizer = load_model(str(tiny_model_dir))
    runs = {}
    for neighbours in (0, 3):
        folder = tmp_path / f"scorer{neighbours}"
        save_scorer(folder, random_scorer(seed=3), NAMMConfig(update_interval=128, threshold=0.0, sinks=4, recent_window=16,
                                                              neighbours=neighbours, smoothing=neighbours and 2),
                    ScorerMetadata(description="test"))
        runs[neighbours] = evaluate_heldout(model, tokenizer, str(folder), prompts_per_task=1, policies=["h2o"],
                                            protected_policies=["h2o"], progress=False, budget=0.25, oracle=False,
                                            resamples=10)
    plain, spread = ({row["policy"]: row for row in runs[n]["rows"]} for n in (0, 3))
    assert spread["h2o+protected"]["label"].startswith("h2o + 4 sinks, 16 recent, 3 neighbours, smoothing 2 (budget ")
    assert spread["h2o+protected"]["protected"] == {"sinks": 4, "recent_window": 16, "neighbours": 3, "smoothing": 2}
    assert plain["h2o+protected"]["protected"] == {"sinks": 4, "recent_window": 16}
    assert spread["h2o"]["scores"] == plain["h2o"]["scores"]  # the published rule runs as published
    assert spread["h2o+protected"]["scores"] != plain["h2o+protected"]["scores"]
    assert spread["namm"]["scores"] != plain["namm"]["scores"]


def test_a_recent_window_override_reaches_the_scorer_and_the_protected_baselines(tmp_path, tiny_model_dir, monkeypatch):
    from helpers import random_scorer

    from namm_cache.evolution.evaluate import evaluate_heldout
    from namm_cache.evolution.run import load_model
    from namm_cache.hub import ScorerMetadata, save_scorer

    folder = tmp_path / "scorer"
    save_scorer(folder, random_scorer(seed=3), NAMMConfig(update_interval=128, threshold=0.0, sinks=4, recent_window=200),
                ScorerMetadata(description="test scorer"))
    model, tokenizer = load_model(str(tiny_model_dir))
    runs = {window: evaluate_heldout(model, tokenizer, str(folder), prompts_per_task=1, policies=[], progress=False,
                                     protected_policies=["h2o"], budget=0.25, recent_window=window, oracle=False,
                                     resamples=10)
            for window in (None, 8)}
    stored, narrow = runs[None], runs[8]
    assert stored["recent_window"] is None and narrow["recent_window"] == 8
    assert narrow["rows"][1]["label"] == "NAMM (budget 25%, 8 recent)" and stored["rows"][1]["label"] == "NAMM (budget 25%)"
    assert narrow["rows"][2]["protected"] == {"sinks": 4, "recent_window": 8}
    assert stored["rows"][2]["protected"] == {"sinks": 4, "recent_window": 200}
    # 200 protected positions fill most of a 25% budget early on; 8 leave the choice to the scores
    assert narrow["rows"][1]["scores"] != stored["rows"][1]["scores"]
    assert narrow["rows"][0]["scores"] == stored["rows"][0]["scores"]  # the full cache is the same
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import render_readme  # the README's command repeats the override

    assert ("--prompts-per-task 1 --budget 0.25 --recent-window 8 --baselines '' --protected-baselines h2o --no-oracle "
            "--out benchmarks/results/tiny.json`"
            in render_readme.render_heldout("tiny")(narrow))


def test_a_floor_and_a_prompt_length_reach_the_held_out_run(tmp_path, tiny_model_dir, monkeypatch):
    from helpers import random_scorer

    from namm_cache.evolution.evaluate import evaluate_heldout
    from namm_cache.evolution.run import load_model
    from namm_cache.hub import ScorerMetadata, save_scorer

    folder = tmp_path / "scorer"
    save_scorer(folder, random_scorer(seed=3), NAMMConfig(update_interval=64, threshold=0.0, max_tokens=32),
                ScorerMetadata(description="test scorer"))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    model, tokenizer = load_model(str(tiny_model_dir))
    runs = {floor: evaluate_heldout(model, tokenizer, str(folder), prompts_per_task=1, policies=["streaming_llm"],
                                    progress=False, no_cap=True, min_fraction=floor, oracle=False, resamples=10, tokens=400)
            for floor in (None, 0.8)}
    plain, floored = runs[None]["rows"][1], runs[0.8]["rows"][1]
    assert runs[0.8]["tokens"] == 400 and runs[0.8]["min_fraction"] == 0.8 and runs[None]["min_fraction"] is None
    assert floored["label"] == "NAMM (threshold, floor 80%)" and plain["label"] == "NAMM (threshold)"
    assert plain["kept_fraction"] < 0.7 and floored["kept_fraction"] >= 0.8  # the floor, not the dropped cap, decides
    longer = evaluate_heldout(model, tokenizer, str(folder), prompts_per_task=1, policies=["streaming_llm"],
                              progress=False, no_cap=True, oracle=False, resamples=10)
    assert longer["tokens"] == 1000 and longer["rows"][0]["scores"] != runs[None]["rows"][0]["scores"]  # other prompts
    import render_readme  # the README's command repeats the floor and the length

    assert "--no-cap --min-fraction 0.8 --tokens 400 --baselines streaming_llm" in render_readme.render_heldout("tiny")(
        {**runs[0.8], "date": "today"})
    with pytest.raises(ValueError, match="floor under the threshold"):
        evaluate_heldout(model, tokenizer, str(folder), prompts_per_task=1, budget=0.25, min_fraction=0.5)


def test_the_best_baseline_is_the_highest_plain_or_protected_baseline_never_namm_full_or_oracle():
    from namm_cache.evolution.evaluate import best_baseline

    rows = [{"policy": policy, "normalized_mean": mean} for policy, mean in
            [("full", 1.0), ("namm", 0.9), ("h2o", 0.4), ("streaming_llm", 0.5), ("h2o+protected", 0.6), ("oracle", 0.95)]]
    assert best_baseline(rows, ["h2o", "streaming_llm"], ["h2o"])["policy"] == "h2o+protected"
    assert best_baseline(rows, ["h2o", "streaming_llm"], [])["policy"] == "streaming_llm"
    assert best_baseline(rows, ["h2o"], [])["policy"] == "h2o"
    assert best_baseline(rows, ["tova"], []) is None


def test_the_depth_table_counts_each_prompt_in_its_slice():
    result = {"depths": {"passkey": [0.05, 0.5, 0.55, 0.99], "needle": [0.3]},
              "rows": [{"label": "NAMM", "correct": {"passkey": [False, True, False, True], "needle": [True]}},
                       {"label": "old row"}]}  # rows written before per-prompt answers are left out
    lines = depth_table(result).splitlines()
    assert lines[0].startswith("| cache | passkey 0%-20% | passkey 20%-40% | passkey 40%-60% |")
    assert len(lines) == 3
    assert lines[2] == "| NAMM | 0/1 | \u2013 | 1/2 | \u2013 | 1/1 | \u2013 | 1/1 | \u2013 | \u2013 | \u2013 |"
    assert depth_table({"rows": result["rows"]}) is None


def test_the_table_reads_results_written_before_the_gate():
    old = {"rows": [{"label": "full cache", "kept_fraction": 1.0, "normalized_mean": 1.0, "per_task": {"passkey": {"score": 0.5}}}]}
    assert "best baseline" not in table(old) and "| full cache | 100% | 1.000 | 0.500 |" in table(old)


@pytest.mark.parametrize("flags", [["--budget", "0"], ["--budget", "1.5"], ["--budget", "abc"], ["--budget", "nan"],
                                   ["--prompts-per-task", "0"], ["--prompts-per-task", "2.5"], ["--resamples", "0"],
                                   ["--bootstrap-seed", "-3"], ["--no-cap", "--budget", "0.25"], ["--scorer-missing"],
                                   ["--out-folder-missing"], ["--baselines", "h2o,nope"], ["--baselines", "full"],
                                   ["--protected-baselines", "h2o,h2o"],
                                   ["--protected-baselines", "h2o"],  # the scorer protects no tokens
                                   ["--baselines", ""], ["--recent-window", "-1"], ["--recent-window", "8.5"],
                                   ["--recent-window", str(2**41)],
                                   ["--recent-window", "0", "--protected-baselines", "h2o", "--scorer-with-window"],
                                   ["--budget", "0.25", "--min-fraction", "0.3"],  # a floor under the threshold only
                                   ["--no-cap", "--min-fraction", "0"], ["--no-cap", "--min-fraction", "1.5"],
                                   ["--tokens", "100"], ["--tokens", "2000.5"]])
def test_the_cli_refuses_bad_flags_with_one_error_line(flags, tmp_path, capsys, monkeypatch):
    from helpers import random_scorer, scorer_folder_without_model

    from namm_cache.hub import ScorerMetadata, save_scorer

    scorer = scorer_folder_without_model(tmp_path / "scorer", NAMMConfig(update_interval=128, threshold=0.0, max_tokens=64),
                                         monkeypatch)
    out = str(tmp_path / "out.json")
    if flags[-1] == "--scorer-with-window":  # protects 8 recent positions, which --recent-window 0 takes away
        flags, scorer = flags[:-1], str(tmp_path / "windowed")
        save_scorer(scorer, random_scorer(seed=3), NAMMConfig(update_interval=128, threshold=0.0, recent_window=8),
                    ScorerMetadata(description="test scorer"))
        with pytest.raises(AssertionError, match="before the model loads"):  # without the override, accepted
            main(["--scorer", scorer, "--out", out, "--protected-baselines", "h2o"])
    if flags == ["--scorer-missing"]:
        scorer, flags = str(tmp_path / "nowhere"), []
    elif flags == ["--out-folder-missing"]:
        out, flags = str(tmp_path / "missing" / "out.json"), []
    code = main(["--scorer", scorer, "--out", out, *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("evaluate: error: ")
