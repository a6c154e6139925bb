"""Evolution: CMA-ES core, calibration, config errors, end-to-end CLI, SIGKILL resume, 1 vs 2 processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from namm_cache import NAMMCache, NAMMConfig
from namm_cache.calibration import KeepAllObservingPolicy, calibrate_normalization
from namm_cache.evolution import EvolutionConfig
from namm_cache.evolution.checkpoint import read_checkpoint
from namm_cache.evolution.run import maximize_with_cma
from namm_cache.tasks import JsonlTask, build_task, qa_f1_score, rouge_l_score

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("separable", [False, True])
def test_cma_converges_on_a_synthetic_fitness(separable):
    target = np.array([3.0, -1.0, 0.5, 2.0, -2.5])
    es = maximize_with_cma(lambda xs: [-float(((x - target) ** 2).sum()) for x in xs], 5,
                               generations=80, population=10, sigma0=1.0, seed=3, separable=separable)
    assert np.abs(es.mean - target).max() < 1e-2


def test_calibration_matches_a_direct_computation():
    model = tiny_model("llama")
    config = NAMMConfig(update_interval=32)
    sequences = [torch.randint(3, 150, (1, 100), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    mean, std = calibrate_normalization(model, sequences, config=config, progress=False)
    collected = []
    cache = NAMMCache(model=model, config=config, policy=KeepAllObservingPolicy())
    cache.feature_observer = lambda layer, features: collected.append(features.double())
    with torch.no_grad():
        for ids in sequences:
            cache.reset()
            for chunk in ids.split(32, dim=1):
                model(input_ids=chunk, cache=cache)
            model(input_ids=ids[:, -1:], cache=cache)
    direct = torch.cat(collected)
    assert direct.shape[0] > 100
    torch.testing.assert_close(mean.double(), direct.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.double(), direct.std(0), rtol=1e-4, atol=1e-6)


def test_metrics_and_jsonl_loader(tmp_path):
    assert qa_f1_score("The Eiffel tower", "eiffel tower") == 1.0
    assert 0 < rouge_l_score("the cat sat on the mat", "a cat sat on a mat") < 1
    data = tmp_path / "hotpotqa.jsonl"
    data.write_text(json.dumps({"context": "Paris is in France.", "input": "Where is Paris?", "answers": ["France"]}) + "\n")
    task = JsonlTask(str(data))
    assert task.metric == "qa_f1"
    (example,) = task.sample(None, random.Random(0), 1)
    assert example.prompt.endswith("Question: Where is Paris?\nAnswer:") and example.answer == " France"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "x"}) + "\n")
    with pytest.raises(ValueError, match="lacks"):
        JsonlTask(str(bad))


def write_config(path: Path, model_dir: Path, generations: int = 2, **extra) -> Path:
    config = {
        "model": str(model_dir),
        "scorer": {"kind": "mlp", "hidden_dim": 8},
        "namm": {"update_interval": 32, "max_tokens": 48},
        "population": 4,
        "sigma0": 0.3,
        "seed": 7,
        "prompts_per_task": 1,
        "calibration_prompts": 1,
        "memory_weight": 0.1,
        "threads": 1,
        "stages": [
            {"tasks": [{"name": "passkey", "tokens": 120}], "generations": 1},
            {"tasks": [{"name": "long_text", "tokens": 100, "answer_tokens": 8}], "generations": generations - 1},
        ],
        **extra,
    }
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args, env_extra=None, check=True, runner=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.update(env_extra or {})
    command = (runner or [sys.executable, "-m", "namm_cache.evolution.cli"]) + list(args) + ["--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(result.stdout[-3000:] + result.stderr[-3000:])
    return result


def final_mean(out: Path) -> np.ndarray:
    state = read_checkpoint(out / "checkpoint.safetensors")
    return state.es.mean, state.generation, state.log


def test_end_to_end_run_writes_a_loadable_scorer_with_card_and_plot(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, generations=2)
    out = tmp_path / "out"
    cli("--config", str(config), "--out", str(out))
    for name in ("checkpoint.safetensors", "log.jsonl", "fitness.png", "scorer/config.json", "scorer/model.safetensors", "scorer/README.md", "scorer/fitness.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in rows] == [0, 1] and rows[1]["tasks"] == ["passkey", "long_text"]
    assert all(0 < r["kept_distribution_mean"] <= 1 for r in rows)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cache = NAMMCache.from_pretrained(out / "scorer", model=model)
    mean, _, _ = final_mean(out)
    torch.testing.assert_close(cache.scorer.get_flat_params(), torch.tensor(mean, dtype=torch.float32))
    assert not torch.equal(cache.scorer.spectrogram_std, torch.ones(17))  # calibrated before generation 0
    card = (out / "scorer" / "README.md").read_text()
    assert "passkey, long_text" in card and "Evolved with CMA-ES" in card
    # --export writes the scorer of the latest checkpoint without running.
    cli("--config", str(config), "--out", str(out), "--export", str(tmp_path / "exported"))
    exported = NAMMCache.from_pretrained(tmp_path / "exported", model=model)
    assert torch.equal(exported.scorer.get_flat_params(), cache.scorer.get_flat_params())
    # A finished run refuses to be overwritten without --resume.
    again = cli("--config", str(config), "--out", str(out), check=False)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_resume_after_sigkill_continues_the_same_trajectory(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, generations=4)
    straight = tmp_path / "straight"
    cli("--config", str(config), "--out", str(straight))
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "namm_cache.evolution.cli", "--config", str(config), "--out", str(killed), "--no-progress"],
                               env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not ((killed / "log.jsonl").is_file() and (killed / "log.jsonl").read_text().strip()):
        time.sleep(0.2)
    # Somewhere inside generation 1: a generation's time is read off the straight run (a fixed pause let a fast
    # machine finish all four generations before the kill).
    seconds = min(row["seconds"] for row in final_mean(straight)[2])
    time.sleep(random.Random().uniform(0.0, seconds))
    process.send_signal(signal.SIGKILL)
    process.wait()
    _, interrupted_at, _ = final_mean(killed)
    assert interrupted_at < 4, "the run finished before it could be killed"
    cli("--config", str(config), "--out", str(killed), "--resume")
    mean_a, generations_a, log_a = final_mean(straight)
    mean_b, generations_b, log_b = final_mean(killed)
    assert generations_a == generations_b == 4
    np.testing.assert_array_equal(mean_a, mean_b)
    assert [r["fitness_best"] for r in log_a] == [r["fitness_best"] for r in log_b]


def test_one_and_two_processes_give_the_same_result(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, generations=2)
    single = tmp_path / "single"
    cli("--config", str(config), "--out", str(single))
    double = tmp_path / "double"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), "-m", "namm_cache.evolution.cli"]
    cli("--config", str(config), "--out", str(double), runner=torchrun)
    mean_1, _, log_1 = final_mean(single)
    mean_2, _, log_2 = final_mean(double)
    np.testing.assert_array_equal(mean_1, mean_2)
    assert [r["fitness_best"] for r in log_1] == [r["fitness_best"] for r in log_2]


@pytest.mark.parametrize(
    "override, message",
    [
        ("population=1", "population must be >= 2"),
        ("stages=[{tasks: [{name: sudoku}], generations: 1}]", "Unknown task 'sudoku'"),
        ("stages=[{tasks: [{name: jsonl, path: /nonexistent/data.jsonl}], generations: 1}]", "not found"),
        ("model=/nonexistent/model", "Model '/nonexistent/model' not found"),
        ("popsize=3", "Unknown config key"),
        ("stages.1.namm={n_fft: 64}", "may only set update_interval, threshold, max_tokens"),
    ],
)
def test_bad_configs_fail_before_any_work(tmp_path, tiny_model_dir, override, message):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir)
    out = tmp_path / "out"
    result = cli("--config", str(config), "--out", str(out), "--set", override, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert not out.exists()


def test_config_loads_toml_and_builds_every_task(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('population = 6\n[[stages]]\ngenerations = 2\ntasks = [{name = "needle_multikey", tokens = 300}]\n')
    config = EvolutionConfig.load(path, ["sigma0=0.1"])
    assert config.population == 6 and config.sigma0 == 0.1 and config.stages[0].generations == 2
    assert build_task({"name": "needle_multikey"}).name == "needle_multikey3"


def test_heldout_evaluation_matches_baselines_to_the_scorers_memory_and_bundles(tmp_path, tiny_model_dir, monkeypatch,
                                                                                 capsys):
    from helpers import random_scorer

    from namm_cache.evolution.evaluate import evaluate_heldout
    from namm_cache.evolution.run import load_model
    from namm_cache.hub import ScorerMetadata, load_scorer, save_scorer, weights_digest

    folder = tmp_path / "scorer"
    save_scorer(folder, random_scorer(seed=3), NAMMConfig(update_interval=128, threshold=0.0, max_tokens=64),
                ScorerMetadata(description="test scorer"))
    model, tokenizer = load_model(str(tiny_model_dir))
    capped = evaluate_heldout(model, tokenizer, str(folder), prompts_per_task=1, policies=["h2o"], progress=False)
    free = evaluate_heldout(model, tokenizer, str(folder), prompts_per_task=1, policies=["h2o"], progress=False, no_cap=True,
                            recent_window=16)
    for result in (capped, free):
        full, namm, h2o, oracle = result["rows"]  # the oracle ceiling comes last
        assert full["kept_fraction"] == 1.0 and full["normalized_mean"] == pytest.approx(1.0)
        assert set(namm["per_task"]) == {"passkey", "needle", "variable_tracking", "long_text"}
        assert abs(h2o["kept_fraction"] - namm["kept_fraction"]) < 0.01  # baselines hold what the scorer held
        assert h2o["label"].startswith("h2o (budget ") and oracle["label"].startswith("oracle (ceiling, budget ")
    # ~1k-token prompts: the cap holds <= 64 tokens + one interval; the threshold alone keeps more.
    assert capped["rows"][1]["kept_fraction"] < 0.25 < free["rows"][1]["kept_fraction"]
    assert capped["rows"][1]["label"] == "NAMM (cap 64)" and free["rows"][1]["label"] == "NAMM (threshold, 16 recent)"

    # Bundling an evaluation made with --no-cap --recent-window 16 stores the scorer without its cap and with that
    # window; every evaluation named lands in the card's results, told apart by their setting.
    sys.path.insert(0, str(ROOT / "tools"))
    import bundle_evolved

    heldout, capped_json = tmp_path / "heldout.json", tmp_path / "capped.json"
    heldout.write_text(json.dumps(free))
    capped_json.write_text(json.dumps(capped))
    monkeypatch.setattr(bundle_evolved, "bundled_root", lambda: tmp_path / "bundled")
    assert bundle_evolved.main([str(folder), str(heldout), str(capped_json), "org/test-bam"]) == 0
    bundled = load_scorer(tmp_path / "bundled" / "org" / "test-bam")
    assert bundled.config.max_tokens is None and bundled.config.threshold == 0.0 and bundled.config.recent_window == 16
    assert torch.equal(bundled.scorer.get_flat_params(), load_scorer(folder).scorer.get_flat_params())
    card = (tmp_path / "bundled" / "org" / "test-bam" / "README.md").read_text()
    assert "NAMM (threshold, 16 recent)" in card and "NAMM (cap 64)" in card and "h2o (budget" in card
    assert "| threshold, 16 recent |" in card and "| stored settings |" in card
    assert "keep score >= 0.0; always kept: the 16 newest |" in card  # the stored window, in the settings table
    # One suite split across two runs (other baselines, same full and NAMM rows) merges into one table and one gate
    # over every baseline of both; the capped run (another setting) stays apart.
    split = evaluate_heldout(model, tokenizer, str(folder), prompts_per_task=1, policies=["streaming_llm"], progress=False,
                             no_cap=True, recent_window=16, oracle=False)
    split_json = tmp_path / "split.json"
    split_json.write_text(json.dumps(split))
    assert bundle_evolved.main([str(folder), str(heldout), str(split_json), str(capped_json), "org/test-split"]) == 0
    card = (tmp_path / "bundled" / "org" / "test-split" / "README.md").read_text()
    assert card.count("| threshold, 16 recent | NAMM (threshold, 16 recent) |") == 1 and card.count("| NAMM (cap 64) |") == 1
    assert "| threshold, 16 recent | streaming_llm (budget" in card and "| threshold, 16 recent | h2o (budget" in card
    best = max(free["rows"][2:3] + split["rows"][2:3], key=lambda row: row["normalized_mean"])
    assert f"At `threshold, 16 recent`: NAMM minus the best baseline ({best['policy']})" in card
    # Refused, each with one error line and nothing written: a budget evaluation first (a budget is not stored),
    # other weights (by the digest evaluate records; by folder for results without it), another prompt suite,
    # a malformed result, an unreadable file, a NAME that is not org/name.
    assert free["scorer_weights"] == weights_digest(load_scorer(folder).scorer)
    inputs = {"budget": dict(free, budget=0.5, no_cap=False), "weights": dict(free, scorer_weights="0" * 64),
              "folder": {k: v for k, v in dict(free, scorer=str(tmp_path / "elsewhere")).items() if k != "scorer_weights"},
              "suite": dict(capped, seed=1), "rowless": dict(free, rows=[{"label": "NAMM"}])}
    for key, value in inputs.items():
        (tmp_path / f"{key}.json").write_text(json.dumps(value))
    capsys.readouterr()  # what the evaluations above printed
    for args, message in (([str(tmp_path / "budget.json")], "fraction budget"), ([str(tmp_path / "weights.json")], "other weights"),
                          ([str(tmp_path / "folder.json")], "other weights"), ([str(heldout), str(tmp_path / "suite.json")], "in seed"),
                          ([str(tmp_path / "rowless.json")], "KeyError"), ([str(tmp_path / "missing.json")], "not a readable")):
        assert bundle_evolved.main([str(folder), *args, "org/refused"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error:") and err.count("\n") == 1
    assert bundle_evolved.main([str(folder), str(heldout), str(capped_json)]) == 2  # NAME left off
    assert "NAME must look like org/name" in capsys.readouterr().err
    assert not (tmp_path / "bundled" / "org" / "refused").exists() and not (tmp_path / "bundled" / "capped.json").exists()


def test_bundled_gate_is_retaken_over_merged_rows_and_names_the_best_published_baseline():
    sys.path.insert(0, str(ROOT / "tools"))
    import bundle_evolved

    from namm_cache.evolution.evaluate import paired_bootstrap

    def row(policy, scores):
        full = [1.0, 0.8, 0.6]
        return {"policy": policy, "label": policy, "scores": {"passkey": scores},
                "normalized_mean": sum(scores) / sum(full)}

    full, namm = row("full", [1.0, 0.8, 0.6]), row("namm", [0.9, 0.8, 0.5])
    first = {"no_cap": True, "date": "d1", "rows": [full, namm, row("h2o", [0.2, 0.1, 0.3])],
             "gate": {"baseline": "h2o", "resamples": 200, "seed": 3}}
    second = {"no_cap": True, "date": "d2", "rows": [full, namm, row("tova", [0.5, 0.2, 0.3]),
                                                     row("key_norm+protected", [0.7, 0.6, 0.4])], "gate": {"baseline": "x"}}
    other = {"no_cap": True, "date": "d3", "rows": [full, row("namm", [0.1, 0.8, 0.5]), row("snapkv", [0.0, 0.0, 0.0])]}
    merged = bundle_evolved.merge_splits([first, second, other])
    assert len(merged) == 2 and [r["policy"] for r in merged[0]["rows"]] == ["full", "namm", "h2o", "tova", "key_norm+protected"]
    assert merged[0]["date"] == "d1, d2" and len(first["rows"]) == 3  # the inputs are not changed
    gate, published = merged[0]["gate"], merged[0]["published_gate"]
    assert gate["baseline"] == "key_norm+protected" and published["baseline"] == "tova"
    expected = paired_bootstrap(namm["scores"], {"passkey": [0.5, 0.2, 0.3]}, full["scores"], resamples=200, seed=3)
    assert {key: published[key] for key in expected} == expected
    assert merged[1]["rows"][1]["scores"]["passkey"][0] == 0.1  # other NAMM scores: apart, with a gate of its own
    assert merged[1]["gate"]["baseline"] == "snapkv"
    oracle_first = {**first, "rows": first["rows"] + [row("oracle", [1.0, 0.8, 0.6])]}
    assert [r["policy"] for r in bundle_evolved.merge_splits([oracle_first, second])[0]["rows"]][-1] == "oracle"
    old_format = {"no_cap": True, "date": "d0", "rows": [{"label": "full cache", "scores": full["scores"]}],
                  "gate": {"baseline": "h2o", "difference": 0.1}}
    kept = bundle_evolved.merge_splits([old_format, old_format])  # rows without a policy: kept apart, gate as given
    assert len(kept) == 2 and kept[0]["gate"] == old_format["gate"]


def test_matched_budget_solves_the_budget_to_kept_line():
    from namm_cache.evolution.evaluate import matched_budget

    # 1000 real tokens, rounds every 128: the last round sees 896 and keeps budget x 896, then 104 more arrive.
    kept = lambda budget: (budget * 896 + 104) / 1000
    for target in (0.3, 0.55, 0.69, 0.95):
        assert kept(matched_budget(target, 0.55, kept(0.55))) == pytest.approx(target)
    assert matched_budget(0.5, 1.0, 1.0) == 0.5  # the probe evicted nothing: no slope to use
    assert matched_budget(0.05, 0.5, kept(0.5)) == 1e-3  # below what any budget reaches: the smallest budget
    with pytest.raises(ValueError, match="Fractions"):
        matched_budget(1.5, 0.5, 0.6)


def test_a_stage_can_change_runtime_settings_and_a_resumed_run_moves_on_to_an_added_stage(tmp_path, tiny_model_dir):
    stages = [{"tasks": [{"name": "passkey", "tokens": 300}], "generations": 1},
              {"tasks": [{"name": "long_text", "tokens": 300, "answer_tokens": 8}], "generations": 1}]
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, stages=stages)
    out = tmp_path / "out"
    cli("--config", str(config), "--out", str(out))  # stages 0 and 1, capped at 48 tokens, memory weight 0.1
    _, generation, log = final_mean(out)
    assert generation == 2 and all(row["kept_distribution_mean"] < 0.35 for row in log)  # <= 48 + 32 of ~300
    # Resume with a third stage: no new task, no cap and a threshold that keeps everything (so the stage's
    # settings visibly reach the caches), a stronger memory term; it starts at once.
    third = "stages.2={tasks: [], generations: 1, namm: {max_tokens: null, threshold: -1.0e+9}, memory_weight: 0.5}"
    cli("--config", str(config), "--out", str(out), "--resume", "--set", third)
    state = read_checkpoint(out / "checkpoint.safetensors")
    assert (state.generation, state.stage, state.stage_generation) == (3, 2, 1)
    row = state.log[-1]
    assert row["stage"] == 2 and row["tasks"] == ["passkey", "long_text"]
    assert row["kept_distribution_mean"] == 1.0
    assert row["fitness_distribution_mean"] == pytest.approx(row["quality_distribution_mean"] - 0.5 * row["kept_distribution_mean"])
    exported = json.loads((out / "scorer" / "config.json").read_text())
    assert exported["namm_config"]["max_tokens"] is None and exported["namm_config"]["threshold"] == -1.0e9
    assert exported["namm_config"]["update_interval"] == 32
    assert "0.5 x kept fraction" in exported["description"]


def test_shipped_smollm2_config_is_valid_and_its_last_stage_trains_the_threshold_alone():
    config = EvolutionConfig.load(ROOT / "evolution" / "configs" / "smollm2.yaml")
    assert config.namm_config(0).max_tokens == 256 and config.namm_config(len(config.stages) - 1).max_tokens is None
    assert [config.stage_memory_weight(i) for i in range(len(config.stages))] == [0.1, 0.1, 0.3, 1.0]
    assert config.namm_config(3).max_tokens is None  # stage 4 inherits stage 3's uncapped settings
    assert config.all_tasks(len(config.stages) - 1) == config.all_tasks(1)  # the last stages add no task


def logged_numbers(out: Path) -> list[dict]:
    """Every row of a run's log without its timings (the entries that may differ between two runs)."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in ("seconds", "cpu_seconds")} for row in rows]


def test_a_run_killed_three_times_resumes_on_the_uninterrupted_trajectory(tmp_path, tiny_model_dir):
    """SIGKILL after generations 2, 6 and 10 of a 12-generation, 3-stage run; every resume must give back exactly
    the numbers (fitness, quality, kept fractions, sigma) and the final distribution mean of an uninterrupted run."""
    stages = [{"tasks": [{"name": "passkey", "tokens": 100}], "generations": 3},
              {"tasks": [{"name": "long_text", "tokens": 80, "answer_tokens": 4}], "generations": 5},
              {"tasks": [], "generations": 4, "memory_weight": 0.3}]
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, stages=stages, population=6)
    straight = tmp_path / "straight"
    cli("--config", str(config), "--out", str(straight))
    assert len(logged_numbers(straight)) == 12

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    interrupted_at = []
    for index, kill_after in enumerate((2, 6, 10)):
        command = [sys.executable, "-m", "namm_cache.evolution.cli", "--config", str(config), "--out", str(killed), "--no-progress"]
        process = subprocess.Popen(command + (["--resume"] if index else []), env=env, cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            log = killed / "log.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= kill_after:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        interrupted_at.append(len(logged_numbers(killed)))
    assert interrupted_at[0] >= 2 and interrupted_at == sorted(set(interrupted_at)) and interrupted_at[-1] < 12, interrupted_at
    cli("--config", str(config), "--out", str(killed), "--resume")

    expected, resumed = logged_numbers(straight), logged_numbers(killed)
    assert len(resumed) == 12
    for row_a, row_b in zip(expected, resumed):
        assert row_a == row_b, f"generation {row_a['generation']} differs after a resume"
    (mean_a, generations_a, _), (mean_b, generations_b, _) = final_mean(straight), final_mean(killed)
    assert generations_a == generations_b == 12
    np.testing.assert_array_equal(mean_a, mean_b)
    from safetensors.torch import load_file

    scorer_a, scorer_b = load_file(straight / "scorer" / "model.safetensors"), load_file(killed / "scorer" / "model.safetensors")
    assert scorer_a.keys() == scorer_b.keys() and all(torch.equal(scorer_a[k], scorer_b[k]) for k in scorer_a)


def test_a_run_can_start_from_a_given_scorer(tmp_path, tiny_model_dir):
    """`initial_scorer` (e.g. a distilled warm start) is the initial mean, and its statistics replace calibration."""
    from namm_cache import MLPScorer, NAMMConfig
    from namm_cache.hub import save_scorer

    start = MLPScorer(hidden_dim=8)
    start.set_flat_params(torch.randn(start.num_parameters(), generator=torch.Generator().manual_seed(3)) * 2.0)
    start.set_normalization(torch.full((17,), 0.25), torch.full((17,), 3.0))
    save_scorer(tmp_path / "start", start, NAMMConfig(update_interval=32))
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, generations=2, initial_scorer=str(tmp_path / "start"))
    out = tmp_path / "out"
    cli("--config", str(config), "--out", str(out))
    mean, _, _ = final_mean(out)
    state = read_checkpoint(out / "checkpoint.safetensors")
    assert state.normalization == ([0.25] * 17, [3.0] * 17)  # the scorer's statistics, not a fresh calibration
    initial = start.get_flat_params().double().numpy()
    assert np.linalg.norm(mean - initial) < 0.5 * np.linalg.norm(initial)  # two generations from it, not from zero
    # A scorer of another kind or size is refused before any work, with what differs.
    other = tmp_path / "other"
    save_scorer(other, MLPScorer(hidden_dim=16), NAMMConfig())
    bad = write_config(tmp_path / "bad.yaml", tiny_model_dir, generations=2, initial_scorer=str(other))
    refused = cli("--config", str(bad), "--out", str(tmp_path / "never"), check=False)
    assert refused.returncode == 2 and "hidden_dim 16 there, 8 here" in refused.stderr
    assert not (tmp_path / "never").exists()
