"""The comparison benchmark runs end to end on a tiny model, writes JSON and PNGs, and resumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_compare_runs_end_to_end_and_skips_finished_cells(tmp_path, tiny_model_dir):
    import compare

    args = ["--model", str(tiny_model_dir), "--tag", "tiny", "--tokens", "150", "--prompts", "1", "--budgets", "0.5",
            "--update-interval", "32", "--policies", "namm,h2o,streaming_llm,oracle", "--scorer", "namm-cache/keep-all",
            "--out-dir", str(tmp_path)]
    path = compare.main(args)
    result = json.loads(path.read_text())
    assert set(result["cells"]) == {"full", "namm@0.5", "h2o@0.5", "streaming_llm@0.5", "oracle@0.5"}
    # The ceiling runs on the prompts that carry a needle only.
    assert set(result["cells"]["oracle@0.5"]["per_task"]) == {"passkey", "needle", "variable_tracking"}
    for name, cell in result["cells"].items():
        assert name == "oracle@0.5" or set(cell["per_task"]) == {"passkey", "needle", "variable_tracking", "long_text"}
        assert 0 < cell["kept_fraction"] <= 1 and "score" in cell
    assert result["cells"]["full"]["kept_fraction"] == 1.0
    assert result["cells"]["h2o@0.5"]["kept_fraction"] < 0.9
    for png in ("compare_tiny_quality.png", "compare_tiny_cost.png"):
        assert (tmp_path / png).stat().st_size > 1000
    seconds = {name: cell["seconds"] for name, cell in result["cells"].items()}
    compare.main(args)  # every cell is done: nothing reruns
    again = json.loads(path.read_text())
    assert {name: cell["seconds"] for name, cell in again["cells"].items()} == seconds
    # Another scorer in a folder (same path, new weights later): only NAMM cells rerun, each time the weights change.
    from helpers import random_scorer

    from namm_cache import NAMMConfig
    from namm_cache.hub import save_scorer

    folder = tmp_path / "scorer"
    save_scorer(folder, random_scorer(seed=1), NAMMConfig(update_interval=32))
    with_folder = [{"namm,h2o,streaming_llm,oracle": "namm,h2o", "namm-cache/keep-all": str(folder)}.get(a, a) for a in args]
    first = json.loads(compare.main(with_folder).read_text())["cells"]
    save_scorer(folder, random_scorer(seed=2), NAMMConfig(update_interval=32))
    second = json.loads(compare.main(with_folder).read_text())["cells"]
    assert first["h2o@0.5"]["seconds"] == second["h2o@0.5"]["seconds"] == seconds["h2o@0.5"]
    assert first["namm@0.5"]["scorer"] != second["namm@0.5"]["scorer"] != again["cells"]["namm@0.5"]["scorer"]
    assert second["namm@0.5"]["scorer"].startswith(f"{folder}@")


def test_ruler_benchmark_runs_end_to_end_and_skips_finished_cells(tmp_path, tiny_model_dir):
    import ruler

    args = ["--model", str(tiny_model_dir), "--tag", "tiny", "--samples", "1", "--budgets", "0.5", "--policies", "h2o",
            "--tasks", "namm_ruler_niah_single_1,namm_ruler_vt", "--out-dir", str(tmp_path)]
    path = ruler.main(args)
    result = json.loads(path.read_text())
    assert set(result["cells"]) == {"full", "h2o@0.5"}
    for cell in result["cells"].values():
        assert set(cell["scores"]) == {"namm_ruler_niah_single_1", "namm_ruler_vt"}
        assert all(0.0 <= score <= 1.0 for score in cell["scores"].values())
    assert result["cells"]["full"]["kept"] == 1.0
    assert 0.4 < result["cells"]["h2o@0.5"]["kept"] < 0.75  # half of each ~1k prompt, plus what was generated since
    assert result["command"].startswith("python benchmarks/ruler.py --model")
    seconds = {name: cell["seconds"] for name, cell in result["cells"].items()}
    ruler.main(args)  # every cell is done: nothing reruns
    assert {name: cell["seconds"] for name, cell in json.loads(path.read_text())["cells"].items()} == seconds


def test_long_context_benchmark_measures_every_cache_at_every_length(tmp_path):
    import long_context

    path = long_context.main(["--model", "random:tiny", "--lengths", "128,256", "--chunk", "32", "--update-interval", "32",
                              "--new-tokens", "3", "--scorer", "namm-cache/smollm2-135m-bam", "--out-dir", str(tmp_path)])
    result = json.loads(path.read_text())
    assert result["command"].startswith("python benchmarks/long_context.py --model random:tiny")
    for length in ("128", "256"):
        rows = result["rows"][length]
        assert set(rows) == set(long_context.CACHES)
        full = rows["dynamic_cache"]
        assert full["kept_fraction"] == 1.0 and full["end_to_end_ratio"] == 1.0
        # 2 layers x 2 KV heads x 16 dims x (keys + values) x 4 bytes per token: the prompt + 3 decode steps' tokens
        assert full["peak_kv_bytes"] == (int(length) + 3) * 2 * 2 * 16 * 2 * 4
        for name in ("namm_25pct", "key_norm_25pct", "h2o_25pct"):
            assert 0.2 <= rows[name]["kept_fraction"] <= 0.45
            assert rows[name]["peak_kv_bytes"] < full["peak_kv_bytes"]
            assert rows[name]["peak_kv_ratio"] == rows[name]["peak_kv_bytes"] / full["peak_kv_bytes"]
        assert all(row["decode_ms_per_token"] > 0 and row["prefill_tokens_per_second"] > 0 for row in rows.values())
    assert (tmp_path / "long_context.png").stat().st_size > 1000
    # Repeated, interleaved runs: each number is the median, the spread is kept and shown.
    path = long_context.main(["--model", "random:tiny", "--lengths", "128", "--chunk", "32", "--update-interval", "32",
                              "--new-tokens", "3", "--caches", "dynamic_cache,namm_25pct", "--repeats", "3",
                              "--out-dir", str(tmp_path), "--tag", "repeated"])
    result = json.loads(path.read_text())
    assert result["repeats"] == 3
    for row in result["rows"]["128"].values():
        low, high = row["decode_ms_per_token_range"]
        assert row["repeats"] == 3 and low <= row["decode_ms_per_token"] <= high
        low, high = row["end_to_end_seconds_range"]
        assert low <= row["end_to_end_seconds"] <= high
    assert f"({low:.2f}-{high:.2f})" in long_context.render_table(result)


def test_profile_splits_the_time_into_phases(tmp_path):
    import profile_observation

    path = profile_observation.main(["--model", "random:tiny", "--prompt-tokens", "128", "--chunk", "32",
                                     "--update-interval", "32", "--new-tokens", "3", "--repeats", "1",
                                     "--out-dir", str(tmp_path)])
    result = json.loads(path.read_text())
    caches = result["caches"]
    assert set(caches["dynamic_cache"]["prefill"]["phases"]) == {"attention", "model outside attention"}
    for name in ("namm_keep_all_observing", "namm_25pct"):
        phases = caches[name]["prefill"]["phases"]
        assert {"attention", "mask", "observe", "append", "score", "select"} <= set(phases)
        assert sum(phases.values()) <= caches[name]["prefill"]["seconds"] + 1e-9
        assert all(seconds >= 0 for seconds in phases.values())
    assert caches["namm_keep_all_observing"]["kept_fraction"] == 1.0
    assert caches["namm_25pct"]["kept_fraction"] < 0.5
    assert "compact" in caches["namm_25pct"]["prefill"]["phases"]
    assert caches["dynamic_cache"]["ratio_to_dynamic_cache"] == 1.0


def test_a_decode_step_reads_tensors_back_to_the_host_about_once_not_once_per_layer():
    """Each read (bool(tensor), .item(), .tolist()) is a device sync on a GPU; per-layer reads made decode
    steps launch-bound. What is left: the model's stopping check and one position check per step, plus
    eviction rounds (every update_interval tokens)."""
    import host_syncs

    result = host_syncs.main(["--model", "random:tiny", "--tokens", "128", "--steps", "32", "--update-interval", "32"])
    reads = result["reads_per_step"]
    assert reads["dynamic_cache"]["total"] == 1.0
    for name in ("namm_25pct", "key_norm_25pct", "h2o_25pct"):
        assert reads[name]["total"] < 3.0, (name, reads[name])
    # Operator calls that are not views (kernel launches on a GPU), beyond DynamicCache's, per layer and step
    # (eviction rounds included): appends write into reserved storage, a decode step's mask is one negation.
    # Before: 29.0 for NAMM (concatenations, zeroed statistics, a causal mask), 13.5 for key_norm.
    operators = result["operators_per_step"]
    extra = {name: (operators[name]["non_view"] - operators["dynamic_cache"]["non_view"]) / result["layers"]
             for name in ("namm_25pct", "key_norm_25pct")}
    assert extra["namm_25pct"] <= 18 and extra["key_norm_25pct"] <= 9, extra


def test_run_check_scores_a_runs_mean_beside_its_baselines_with_an_interval(tmp_path, tiny_model_dir):
    import run_check

    from namm_cache.evolution.config import EvolutionConfig
    from namm_cache.evolution.run import EvolutionRun

    settings = {"model": str(tiny_model_dir), "scorer": {"kind": "linear"},
                "namm": {"update_interval": 32, "max_tokens": 40, "sinks": 2, "recent_window": 16},
                "population": 4, "seed": 3, "prompts_per_task": 1, "calibration_prompts": 1, "threads": 1,
                "fitness": "replay", "replay_refeed": 32, "validation_baselines": ["streaming_llm", "h2o"],
                "stages": [{"tasks": [{"name": "passkey", "tokens": 150}], "generations": 1}]}
    EvolutionRun(EvolutionConfig.from_dict(settings), tmp_path / "run", progress=False).run()
    result = run_check.main(["--run", str(tmp_path / "run"),
                             "--prompts-per-task", "3", "--resamples", "200", "--out", str(tmp_path / "check.json")])
    assert result["prompts"] == 3 and result["generation"] == 1
    assert set(result["rows"]) == {"mean", "streaming_llm", "h2o"}
    for name, row in result["rows"].items():
        assert len(row["scores"]["passkey"]) == 3 and 0 < row["kept"] < 1
    streaming = result["intervals"]["streaming_llm"]
    expected = result["rows"]["mean"]["normalized"] - result["rows"]["streaming_llm"]["normalized"]
    assert abs(streaming["difference"] - expected) < 1e-9 and streaming["low"] <= streaming["difference"] <= streaming["high"]
    assert json.loads((tmp_path / "check.json").read_text())["intervals"].keys() == {"streaming_llm", "h2o"}


def test_the_readme_shows_the_flags_that_chose_a_held_out_run_s_baselines():
    import render_readme

    from namm_cache.evolution.evaluate import BASELINES

    def result(policies, depths=True):
        rows = [{"policy": policy} for policy in ["full", "namm", *policies]]
        return {"rows": rows, **({"depths": {}} if depths else {})}

    assert render_readme.baseline_flags(result([*BASELINES, "oracle"])) == ""
    assert render_readme.baseline_flags(result(["h2o", "h2o+protected", "snapkv+protected"])) == (
        " --baselines h2o --protected-baselines h2o,snapkv --no-oracle")
    assert render_readme.baseline_flags(result(["h2o", "oracle"], depths=False)) == " --baselines h2o"
    assert render_readme.baseline_flags({"rows": [{"label": "written before rows named their policy"}]}) == ""
    assert render_readme.baseline_flags(result(["key_norm+protected", "oracle"])) == (
        " --baselines '' --protected-baselines key_norm")


def test_evidence_retention_counts_what_each_cache_holds_of_the_needle(tmp_path, tiny_model_dir):
    import evidence_retention
    from helpers import random_scorer

    from namm_cache import CacheSpec, NAMMConfig
    from namm_cache.evolution.run import load_model
    from namm_cache.hub import ScorerMetadata, save_scorer

    folder = tmp_path / "scorer"
    config = NAMMConfig(update_interval=64, threshold=0.0, max_tokens=96, sinks=4, recent_window=32)
    save_scorer(folder, random_scorer(seed=3), config, ScorerMetadata(description="test scorer"))
    out = tmp_path / "retention.json"
    result = evidence_retention.main(["--scorer", str(folder), "--model", str(tiny_model_dir), "--baselines", "streaming_llm",
                                      "--prompts-per-task", "1", "--tokens", "300", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"] and out.with_suffix(".png").stat().st_size > 1000
    rows = {row["policy"]: row for row in result["rows"]}
    assert list(rows) == ["full", "namm", "streaming_llm", "oracle"]
    assert list(rows["namm"]["held_by_group"]) == ["punctuation", "words", *(f"depth {a}-{a + 20}%" for a in range(0, 100, 20))]
    shares = rows["namm"]["held_by_group"]
    assert shares["depth 80-100%"] is None  # none decided: the last round's window covers the prompt's end
    assert all(0.0 <= share <= 1.0 for name, share in shares.items() if name != "depth 80-100%")
    assert rows["full"]["normalized"] == {"passkey": 1.0, "needle": 1.0}
    assert result["tasks"] == ["passkey", "needle"]  # the default --tasks
    tracked = evidence_retention.main(["--scorer", str(folder), "--model", str(tiny_model_dir), "--baselines", "streaming_llm",
                                       "--tasks", "variable_tracking", "--prompts-per-task", "1", "--tokens", "300",
                                       "--out", str(tmp_path / "tracking.json")])
    tracked_rows = {row["policy"]: row for row in tracked["rows"]}
    assert tracked["tasks"] == ["variable_tracking"] and tracked_rows["full"]["normalized"] == {"variable_tracking": 1.0}
    assert tracked_rows["oracle"]["evidence_retention"] == 1.0  # its statements are the evidence, all held
    layers = 2
    # The oracle holds every evidence token in every head (4 sinks + 32 recent + the needle fit in 96 tokens).
    assert rows["oracle"]["evidence_by_layer"] == [1.0] * layers and rows["oracle"]["evidence_retention"] == 1.0
    for policy in ("namm", "streaming_llm"):
        assert len(rows[policy]["evidence_by_layer"]) == layers
        assert 0.0 <= rows[policy]["base_rate"] < 0.5 and 0.2 < rows[policy]["kept_fraction"] < 0.5
    # A full cache holds everything; counting is per (token, KV head) pair.
    model, tokenizer = load_model(str(tiny_model_dir))
    prompt = torch.arange(200).unsqueeze(0) + 1000
    full = evidence_retention.retention_after_prompt(model, CacheSpec(policy="full", config=config).build(model), prompt,
                                                     torch.tensor([50, 51]), 64, sinks=4, recent_window=32)
    assert full == {"evidence": [1.0] * layers, "base": [1.0] * layers}
    early = torch.zeros(200, dtype=torch.bool)
    early[:120] = True
    held = evidence_retention.retention_after_prompt(model, CacheSpec(policy="streaming_llm", budget=96, config=config.replace(max_tokens=None)).build(model),
                                                     prompt, torch.tensor([50, 51]), 64, sinks=4, recent_window=32,
                                                     groups={"early": early, "late": ~early})
    # The last round ran at 192 tokens seen (when 192..199 arrived): streaming_llm kept 4 sinks and the 92 newest
    # (100..191), the window protecting 160..191. Decided: 4..159 less the 2 evidence tokens; it holds 100..159, 60 of 154.
    # Of the decided non-evidence tokens before 120 (4..119 less 50, 51: 114) it holds 100..119 (20); after, all 40.
    assert held == {"evidence": [0.0] * layers, "base": [pytest.approx(60 / 154)] * layers,
                    "early": [pytest.approx(20 / 114)] * layers, "late": [1.0] * layers}
    with pytest.raises(ValueError, match="taken"):
        evidence_retention.retention_after_prompt(model, CacheSpec(policy="full", config=config).build(model), prompt,
                                                  torch.tensor([50]), 64, sinks=4, recent_window=32, groups={"base": early})


def test_token_groups_split_punctuation_and_markup_from_words_and_slice_depth(tiny_model_dir):
    from evidence_retention import token_groups
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # SmolLM2's
    text = "<|im_start|>user\nAnd God said, Let there be light.\n"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    groups = token_groups(tokenizer, ids, bins=2)
    pieces = [tokenizer.decode([token]) for token in ids[0].tolist()]
    marked = [piece for piece, flag in zip(pieces, groups["punctuation"].tolist()) if flag]
    assert marked == ["<|im_start|>", "\n", ",", ".", "\n"]
    assert [piece for piece, flag in zip(pieces, groups["words"].tolist()) if flag] == [
        piece for piece in pieces if piece not in marked]
    assert groups["depth 0-50%"].sum() + groups["depth 50-100%"].sum() == ids.shape[1]
    assert not (groups["depth 0-50%"] & groups["depth 50-100%"]).any() and groups["depth 0-50%"][0]
    for bins in (0, 101):
        with pytest.raises(ValueError, match="bins"):
            token_groups(tokenizer, ids, bins=bins)


def test_held_shares_count_each_head_s_own_tokens_and_skip_empty_slots():
    from evidence_retention import held_shares

    positions = torch.tensor([[0, 2, 5, 7], [1, 2, 3, 5]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])  # head 0's last slot is empty (7 evicted)
    needle = torch.zeros(8, dtype=torch.bool)
    needle[[2, 7]] = True
    haystack = ~needle
    haystack[0] = False
    # needle pairs: (2, h0) held, (7, h0) empty slot, (2, h1) held, (7, h1) not held -> 2 of 4
    # haystack 1, 3, 4, 5, 6: head 0 holds 5; head 1 holds 1, 3, 5 -> 4 of 10
    assert held_shares(positions, valid, needle, haystack) == pytest.approx((0.5, 0.4))
    assert held_shares(positions, valid, haystack) == pytest.approx((0.4,))  # one mask, one share
    empty = torch.zeros(8, dtype=torch.bool)
    assert all(share != share for share in held_shares(positions, valid, empty, empty))  # NaN when nothing to count
    for masks in ((), (needle, torch.zeros(9, dtype=torch.bool))):
        with pytest.raises(ValueError, match="one length"):
            held_shares(positions, valid, *masks)


@pytest.mark.parametrize("flags", [["--baselines", "nope"], ["--baselines", "full"], ["--prompts-per-task", "0"],
                                   ["--threads", "0"], ["--budget", "2"], ["--tokens", "x"], ["--haystack", "nowhere"],
                                   ["--scorer", "/nonexistent/scorer"], ["--out", "/nonexistent/dir/out.json"],
                                   ["--tasks", "long_text"], ["--tasks", ","]])
def test_evidence_retention_refuses_bad_flags_with_one_error_line_before_loading_the_model(flags, tmp_path, capsys, monkeypatch):
    import evidence_retention
    from helpers import scorer_folder_without_model

    from namm_cache import NAMMConfig

    folder = scorer_folder_without_model(tmp_path / "scorer", NAMMConfig(update_interval=64, max_tokens=96, sinks=4,
                                                                         recent_window=32), monkeypatch)
    argv = {"--scorer": folder, "--out": str(tmp_path / "out.json")}
    argv.update(dict(zip(flags[::2], flags[1::2])))
    with pytest.raises(SystemExit) as stopped:
        evidence_retention.main([part for pair in argv.items() for part in pair])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and err.startswith("evidence_retention: error: ")


def test_pooled_low_key_norm_shares_each_tokens_score_across_heads_and_layers():
    from needle_features import pooled_low_key_norm

    torch.manual_seed(0)
    layers, heads, tokens = 3, 2, 6
    log_norms = torch.randn(layers * heads, tokens, 2) * torch.arange(1, layers * heads + 1).view(-1, 1, 1)  # scales differ
    valid = torch.ones(layers * heads, tokens, dtype=torch.bool)
    valid[:, -1] = False  # not arrived: left out of every row's statistics
    per_layer, all_layers = pooled_low_key_norm(log_norms, valid, heads)
    keys = log_norms[..., 0]
    z = torch.zeros_like(keys)
    for row in range(layers * heads):
        held = keys[row, :-1]
        z[row, :-1] = -(held - held.mean()) / held.std(unbiased=False)
    for layer in range(layers):
        rows = slice(layer * heads, (layer + 1) * heads)
        expected = z[rows].mean(0)
        assert torch.allclose(per_layer[rows], expected.expand(heads, -1), atol=1e-5)  # this layer's heads, not another's
    assert torch.allclose(all_layers, z.mean(0).expand(layers * heads, -1), atol=1e-5)
    # The lowest key norm in every row is also the highest pooled score.
    lowest = torch.zeros(layers * heads, tokens)
    lowest[:, 2] = -5.0
    _, pooled = pooled_low_key_norm(torch.stack([lowest, lowest], -1), valid, heads)
    assert pooled[0, :-1].argmax() == 2
    with pytest.raises(ValueError, match="whole layers"):
        pooled_low_key_norm(log_norms[:5], valid[:5], heads)


def test_paired_heldout_compares_two_namm_rows_on_the_same_prompts_and_refuses_others(tmp_path, capsys):
    import json

    import numpy as np
    from paired_heldout import compare, main

    from namm_cache.evolution.evaluate import paired_bootstrap

    rng = np.random.default_rng(0)
    full = {"passkey": rng.uniform(0.5, 1, 30).tolist(), "needle": rng.uniform(0.5, 1, 30).tolist()}

    def result(shift: float, seed: int = 987654321) -> dict:
        namm = {task: (np.asarray(values) * rng.uniform(0.6, 1.0, 30) + shift).tolist() for task, values in full.items()}
        return {"model": "m", "seed": seed, "tasks": ["passkey", "needle"], "prompts_per_task": 30, "scorer": f"s{shift}",
                "rows": [{"policy": "full", "label": "full cache", "scores": full, "kept_fraction": 1.0, "normalized_mean": 1.0},
                         {"policy": "namm", "label": "NAMM", "scores": namm, "kept_fraction": 0.4, "normalized_mean": 0.8}]}

    better, worse = result(0.1), result(0.0)
    comparison = compare(better, worse, resamples=500, seed=1)
    expected = paired_bootstrap(*[{t: np.asarray(v) for t, v in row["scores"].items()}
                                  for row in (better["rows"][1], worse["rows"][1], better["rows"][0])], resamples=500, seed=1)
    assert comparison["difference"] == pytest.approx(expected["difference"]) and comparison["low"] == expected["low"]
    assert comparison["low"] > 0  # +0.1 on every prompt is seen
    rule = {**worse, "rows": worse["rows"] + [{**worse["rows"][1], "policy": "h2o+protected", "label": "rule"}]}
    rule["rows"][1] = {**better["rows"][1], "label": "not this one"}
    against_rule = compare(better, rule, resamples=500, seed=1, b_row="h2o+protected")
    assert against_rule["b_label"] == "rule" and against_rule["difference"] == pytest.approx(expected["difference"])
    with pytest.raises(ValueError, match="B has no 'snapkv' row"):
        compare(better, rule, b_row="snapkv")
    with pytest.raises(ValueError, match="seed"):
        compare(better, result(0.0, seed=1))
    rounded = result(0.0)  # the full cache run again elsewhere: the same scores up to float rounding
    rounded["rows"][0] = {**rounded["rows"][0], "scores": {t: [s * (1 + 3e-6) for s in v] for t, v in full.items()}}
    assert compare(better, rounded, resamples=500, seed=1)["b_normalized_mean"] == rounded["rows"][1]["normalized_mean"]
    other = result(0.0)
    other["rows"][0] = {**other["rows"][0], "scores": {t: [s + 0.01 for s in v] for t, v in full.items()}}
    with pytest.raises(ValueError, match="full-cache rows differ"):
        compare(better, other)
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, data in zip(paths, (better, other)):
        path.write_text(json.dumps(data))
    assert main([str(p) for p in paths]) == 2
    assert capsys.readouterr().err.startswith("paired_heldout: error: the full-cache rows differ")


def test_depth_probe_reads_scorer_changes_and_refuses_malformed_ones():
    from depth_probe import parse_scorer

    assert parse_scorer("runs/x") == ("runs/x", {}, {})
    assert parse_scorer("runs/x:smoothing=12, p28=-0.1,max_tokens=none,threshold=0.5") == (
        "runs/x", {"smoothing": 12, "max_tokens": None, "threshold": 0.5}, {28: -0.1})
    assert parse_scorer("run:12/x:p1=2") == ("run:12/x", {}, {1: 2.0})  # the changes follow the last colon
    for bad in (":smoothing=1", "runs/x:smoothing", "runs/x:=3", "runs/x:smoothing=big", "runs/x:p3=none", "runs/x:p3=nan",
                "runs/x:p3=inf", "runs/x:p3=1,p3=2"):
        with pytest.raises(ValueError, match="--scorer"):
            parse_scorer(bad)


def test_depth_probe_places_needles_at_even_depths_and_matches_each_baseline_to_its_scorer(tmp_path, tiny_model_dir):
    import depth_probe
    from helpers import random_scorer

    from namm_cache import NAMMConfig
    from namm_cache.hub import ScorerMetadata, load_scorer, save_scorer

    folder = tmp_path / "scorer"
    save_scorer(folder, random_scorer(seed=3), NAMMConfig(update_interval=64, threshold=0.0, sinks=4, recent_window=32),
                ScorerMetadata(description="test scorer"))
    first = float(load_scorer(str(folder)).scorer.get_flat_params()[0])
    out = tmp_path / "probe.json"
    result = depth_probe.main(["--scorer", f"{folder}:max_tokens=100", "--scorer", f"{folder}:max_tokens=150,smoothing=2,p0={first + 1}",
                               "--baselines", "streaming_llm", "--model", str(tiny_model_dir), "--prompts-per-task", "3",
                               "--tokens", "300", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    scorer_a, baseline_a, scorer_b, baseline_b = result["rows"]
    assert (scorer_a["config"]["max_tokens"], scorer_b["config"]["max_tokens"], scorer_b["config"]["smoothing"]) == (100, 150, 2)
    assert "smoothing" not in scorer_a["config"] and scorer_a["scorer_weights"] != scorer_b["scorer_weights"]
    for task, depths in result["depths"].items():  # 5%..95% in thirds: one prompt in each
        assert len(depths) == 3 and depths == sorted(depths) and depths[0] < 0.33 < depths[1] < 0.67 < depths[2]
    for scorer, baseline in ((scorer_a, baseline_a), (scorer_b, baseline_b)):
        assert baseline["beside"] == scorer["scorer"] and baseline["policy"] == "streaming_llm"
        assert [len(answers) for answers in baseline["correct"].values()] == [3, 3]
        assert baseline["kept_fraction"] == pytest.approx(scorer["kept_fraction"], abs=0.03)  # the matched budget
    assert scorer_a["kept_fraction"] < scorer_b["kept_fraction"] < 1.0  # caps of 100 and 150 tokens (plus the tokens after the last round)


@pytest.mark.parametrize("flags", [["--baselines", "nope"], ["--prompts-per-task", "0"], ["--tokens", "100"],
                                   ["--tasks", "long_text"], ["--haystack", "nowhere"], ["--out", "/nonexistent/dir/o.json"],
                                   ["--scorer", "/nonexistent/scorer"], ["--scorer", "{folder}:nope=1"],
                                   ["--scorer", "{folder}:smoothing=-1"], ["--scorer", "{folder}:p99999=1"],
                                   ["--scorer", "{folder}:recency_dim=4"]])
def test_depth_probe_refuses_bad_flags_with_one_error_line_before_loading_the_model(flags, tmp_path, capsys, monkeypatch):
    import depth_probe
    from helpers import scorer_folder_without_model

    from namm_cache import NAMMConfig

    folder = scorer_folder_without_model(tmp_path / "scorer", NAMMConfig(update_interval=64), monkeypatch)
    argv = {"--scorer": folder, "--out": str(tmp_path / "out.json")}
    argv.update({flag: value.format(folder=folder) for flag, value in zip(flags[::2], flags[1::2])})
    with pytest.raises(SystemExit) as stopped:
        depth_probe.main([part for pair in argv.items() for part in pair])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and err.startswith("depth_probe: error: ")
