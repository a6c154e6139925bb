"""Held-out evaluation of an evolved scorer against the full cache and the baselines at the same memory.

    python -m namm_cache.evolution.evaluate --scorer runs/smollm2-bam/scorer --out runs/smollm2-bam/heldout.json
    python -m namm_cache.evolution.evaluate --scorer ... --budget 0.25 --out ...   # NAMM keeps its top 25%
    python -m namm_cache.evolution.evaluate --scorer ... --budget 0.25 --recent-window 64 --out ...   # 64 newest protected

Prompts are the held-out suite (`namm_cache.tasks.heldout_examples`: `kjv_proverbs` haystacks, a seed never
used in training), 30 per task by default. The scorer runs with its stored settings, or with `--no-cap` with
its score threshold alone (its own memory use), or with `--budget F` under a fraction budget (its top F of the
tokens seen at each eviction round); every baseline then runs with the fraction budget under which it holds
the scorer's measured mean kept fraction (solved from one probe run, `matched_budget`), so the comparison is
at the same retained KV. Scores are normalised by the full cache on the same prompts (teacher-forced answer
probability; passkey / needle / variable tracking also report greedy exact-answer accuracy).

Every row keeps its per-prompt scores (the same prompts for every cache). The gate compares NAMM with the best
baseline (highest normalised mean) by a paired bootstrap over prompts (`paired_bootstrap`): the 95% interval
of the difference of normalised means and of their ratio. An `oracle (ceiling)` row, at the same budget,
keeps each prompt's evidence (the needle sentences), 4 sinks and the most recent tokens, on the tasks whose
examples carry evidence; it is a ceiling, never the best baseline. `--protected-baselines h2o,key_norm` adds
those baselines once more with the scorer's own protected tokens (sinks, recent window) inside the same budget,
to tell what the scorer picks from what it is told to keep; they compete for the best baseline too. Bad flags
exit with status 2 and one `error:` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from tqdm.auto import tqdm

from namm_cache import CacheSpec, NAMMConfig
from namm_cache.config import MAX_TOKEN_COUNT, PROTECTION
from namm_cache.policies import BASELINE_POLICIES, COMPARABLE_POLICIES
from namm_cache.hub import load_scorer, weights_digest
from namm_cache.tasks import HELDOUT_SEED, Example, heldout_examples, heldout_tasks
from namm_cache.validation import check_float, check_int

from .fitness import ExampleResult, answers_correctly, evaluate_examples, mean_kept_fraction, score_and_answer

BASELINES = list(BASELINE_POLICIES)  # every published baseline, in registry order: the default
ACCEPTED_BASELINES = list(COMPARABLE_POLICIES)  # what --baselines accepts: those and this project's pooled_key_norm rule
GATE_PROMPTS_PER_TASK = 30  # the gate's minimum: fewer prompts give intervals too wide to decide anything
RESAMPLES = 10_000
MIN_SUITE_TOKENS = 256  # shorter prompts leave almost no haystack around the facts and question
DEPTH_TASKS = ("passkey", "needle")  # one needle each: its depth says what a cache must have kept
DEPTH_BINS = 5


def matched_budget(target: float, probe_budget: float, probe_kept: float) -> float:
    """The fraction budget under which a baseline holds `target` of the real tokens, as NAMM measures it.

    Every fraction-budget policy holds the same number of tokens: at each eviction round `budget` x the real
    tokens seen so far, plus every token appended after the last round. The measured kept fraction is thus
    linear in the budget and equals 1 at budget 1, so one probe `(probe_budget, probe_kept)` fixes the line."""
    if not 0.0 < target <= 1.0 or not 0.0 < probe_budget <= 1.0 or not 0.0 <= probe_kept <= 1.0:
        raise ValueError(f"Fractions must lie in (0, 1]: target {target}, probe budget {probe_budget}, probe kept {probe_kept}.")
    if probe_kept >= 1.0 or probe_budget >= 1.0:
        return target  # nothing was evicted in the probe: no information on the slope
    slope = (1.0 - probe_kept) / (1.0 - probe_budget)
    return max(1e-3, min(1.0, 1.0 - (1.0 - target) / slope))


def _normalized_means(scores: dict[str, np.ndarray], full: dict[str, np.ndarray]) -> np.ndarray:
    """Mean over tasks of (mean score / full-cache mean score); `(..., prompts)` arrays give `(...)` results.

    A task whose full-cache mean is 0 has no ratio and is left out (NaN; all NaN gives NaN)."""
    ratios = []
    for task in scores:
        reference = full[task].mean(axis=-1)
        mine = scores[task].mean(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(np.where(reference > 0, mine / np.where(reference > 0, reference, 1.0), np.nan))
    stacked = np.stack(ratios)
    counted = (~np.isnan(stacked)).sum(axis=0)
    total = np.nansum(stacked, axis=0)
    return np.where(counted > 0, total / np.maximum(counted, 1), np.nan)


def paired_bootstrap(namm: dict[str, Any], baseline: dict[str, Any], full: dict[str, Any], *,
                     resamples: int = RESAMPLES, seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """Paired bootstrap over prompts of (NAMM normalised mean - baseline normalised mean), and of their ratio.

    Args:
        namm, baseline, full: `{task: (prompts,) scores}`, the same tasks, and for each task the same prompts in
            the same order in all three (a row's per-prompt scores).
        resamples: bootstrap resamples; each draws, within every task, prompt indices with replacement
            (numpy `default_rng(seed)`) and applies the same draw to NAMM, the baseline and the full cache.
        confidence: the percentile interval's coverage.

    Returns `{difference, low, high, ratio, ratio_low, ratio_high, resamples, seed, confidence}`: the point
    estimates on the prompts as measured and the percentile interval of each over the resamples. The normalised
    mean is the mean over tasks of (mean score / full-cache mean score), as in the results table.
    """
    resamples = check_int("resamples", resamples, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    confidence = check_float("confidence", confidence, above=0.0, below=1.0)
    if not namm or set(namm) != set(baseline) or set(namm) != set(full):
        raise ValueError(f"NAMM, baseline and full cache must score the same tasks (at least one): "
                         f"{sorted(namm)}, {sorted(baseline)}, {sorted(full)}.")
    arrays = {}
    for task in namm:
        rows = [np.asarray(scores[task], dtype=np.float64) for scores in (namm, baseline, full)]
        if any(row.ndim != 1 for row in rows) or len({row.shape[0] for row in rows}) != 1 or rows[0].shape[0] == 0:
            raise ValueError(f"Task {task!r}: NAMM, baseline and full cache need the same non-zero number of "
                             f"per-prompt scores (paired), got {[row.shape for row in rows]}.")
        if not all(np.isfinite(row).all() for row in rows):
            raise ValueError(f"Task {task!r}: per-prompt scores must be finite.")
        arrays[task] = rows
    point = {name: _normalized_means({t: rows[i] for t, rows in arrays.items()}, {t: rows[2] for t, rows in arrays.items()})
             for i, name in enumerate(("namm", "baseline"))}
    rng = np.random.default_rng(seed)
    drawn: list[dict[str, np.ndarray]] = [{}, {}, {}]
    for task, rows in arrays.items():
        index = rng.integers(0, rows[0].shape[0], size=(resamples, rows[0].shape[0]))
        for i, row in enumerate(rows):
            drawn[i][task] = row[index]
    namm_means, baseline_means = _normalized_means(drawn[0], drawn[2]), _normalized_means(drawn[1], drawn[2])
    tail = (1.0 - confidence) / 2 * 100
    difference = namm_means - baseline_means
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = namm_means / baseline_means
    low, high = np.nanpercentile(difference, [tail, 100 - tail]) if np.isfinite(difference).any() else (np.nan, np.nan)
    finite = ratio[np.isfinite(ratio)]
    ratio_low, ratio_high = np.percentile(finite, [tail, 100 - tail]) if finite.size else (np.nan, np.nan)
    point_ratio = point["namm"] / point["baseline"] if point["baseline"] > 0 else float("nan")
    return {"difference": float(point["namm"] - point["baseline"]), "low": float(low), "high": float(high),
            "ratio": float(point_ratio), "ratio_low": float(ratio_low), "ratio_high": float(ratio_high),
            "resamples": resamples, "seed": seed, "confidence": confidence}


def evaluate_heldout(model, tokenizer, scorer_path: str, *, prompts_per_task: int = GATE_PROMPTS_PER_TASK,
                     policies: list[str] | None = None, protected_policies: list[str] | None = None,
                     progress: bool = True, no_cap: bool = False,
                     budget: float | None = None, recent_window: int | None = None, oracle: bool = True,
                     resamples: int = RESAMPLES, seed: int = 0, min_fraction: float | None = None,
                     tokens: int = 1000) -> dict[str, Any]:
    """Full cache, the scorer, the baselines and the oracle ceiling (at the scorer's measured kept fraction) on
    held-out prompts, with the gate's paired bootstrap of NAMM against the best baseline (`result["gate"]`).

    `no_cap=True` drops the scorer's stored `max_tokens`, so it keeps what its threshold keeps; `budget=F` runs
    it under a fraction budget instead (its top F, no cap). `recent_window=W` replaces the scorer's stored recent
    window (the newest W positions it keeps whatever their score; protected baselines get it too).
    `min_fraction=F` gives the threshold a floor (`NAMMConfig.min_fraction`: at least the top F of the tokens
    seen). `tokens` is the suite's prompt length (the gate's tables use 1,000). Each row holds
    `per_task` means and `scores` (`{task: [per-prompt teacher-forced probability]}`, prompts in suite order).

    `policies` are the baselines run by their own rules (default: every registered one); `protected_policies`
    adds a row per named policy run with the scorer's own protected tokens (its `sinks` and `recent_window`,
    which count toward the same budget), policy `"<name>+protected"`: whether the scorer wins by what it picks
    or by what it is told to keep. Both kinds compete for the gate's best baseline."""
    prompts_per_task = check_int("prompts_per_task", prompts_per_task, minimum=1)
    budget = check_float("budget", budget, above=0.0, maximum=1.0, optional=True)
    resamples = check_int("resamples", resamples, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    recent_window = check_int("recent_window", recent_window, minimum=0, maximum=MAX_TOKEN_COUNT, optional=True)
    min_fraction = check_float("min_fraction", min_fraction, above=0.0, maximum=1.0, optional=True)
    tokens = check_int("tokens", tokens, minimum=MIN_SUITE_TOKENS, maximum=MAX_TOKEN_COUNT)
    if min_fraction is not None and budget is not None:
        raise ValueError("min_fraction is a floor under the threshold; a fraction budget sets its own count.")
    if no_cap and budget is not None:
        raise ValueError("Choose one of no_cap (the scorer's threshold) and budget (a fraction budget), not both.")
    baselines = check_baselines("policies", BASELINES if policies is None else policies)
    protected_baselines = check_baselines("protected_policies", protected_policies or [])
    if not baselines and not protected_baselines:
        raise ValueError("Name at least one baseline: the gate compares the scorer with the best of them.")
    loaded = load_scorer(scorer_path)
    if recent_window is not None:
        loaded.config = loaded.config.replace(recent_window=recent_window)
    if min_fraction is not None:
        loaded.config = loaded.config.replace(min_fraction=min_fraction)
    if protected_baselines and not (loaded.config.sinks or loaded.config.recent_window):
        raise ValueError(f"{scorer_path} protects no tokens (sinks = recent_window = 0): protected baselines would "
                         "repeat the plain ones.")
    config = loaded.config.replace(max_tokens=None) if no_cap or budget is not None else loaded.config
    if no_cap and config.threshold is None:
        raise ValueError(f"{scorer_path} has no score threshold: without its cap it would keep every token.")
    chunk = config.update_interval
    examples = heldout_examples(tokenizer, prompts_per_task, tokens=tokens)

    def run(make_cache, label: str, policy: str, on: list[Example] | None = None) -> dict[str, Any]:
        """Score `on` (default: every example), a fresh `make_cache(example)` per prompt: the teacher-forced
        score, and for all but long text the greedy answer from the same prefill (`score_and_answer`)."""
        on = examples if on is None else on
        results, correct = [], {}
        for example in on:
            if example.task != "long_text" and example.metric == "logprob":
                both = score_and_answer(model, tokenizer, make_cache(example), example, chunk)
                results.append(ExampleResult(both.score, both.kept_fraction))
                correct.setdefault(example.task, []).append(both.correct)
                continue
            results += evaluate_examples(model, tokenizer, [example], lambda: make_cache(example), chunk=chunk)
            if example.task != "long_text":
                correct.setdefault(example.task, []).append(answers_correctly(model, tokenizer, make_cache(example), example, chunk))
        scores: dict[str, list[float]] = {}
        for example, result in zip(on, results):
            scores.setdefault(example.task, []).append(result.score)
        per_task: dict[str, dict[str, float]] = {}
        for task, values in scores.items():
            per_task[task] = {"score": sum(values) / len(values)}
            if task in correct:
                per_task[task]["accuracy"] = sum(correct[task]) / len(correct[task])
        return {"label": label, "policy": policy, "kept_fraction": mean_kept_fraction(results), "per_task": per_task,
                "scores": scores, "correct": correct}

    def maker(spec: CacheSpec):
        return lambda example: spec.build(model)

    with_evidence = [e for e in examples if e.evidence]
    bar = tqdm(total=2 + len(baselines) + len(protected_baselines) + bool(oracle and with_evidence), desc="held-out",
               disable=not progress)
    full = run(maker(CacheSpec(policy="full", config=config)), "full cache", "full")
    bar.update(1)
    if budget is not None:
        mode = f"budget {budget:.0%}"
    else:
        mode = "threshold" if no_cap else (f"cap {config.max_tokens}" if config.max_tokens else "stored settings")
    if recent_window is not None:
        mode += f", {recent_window} recent"
    if budget is None and config.min_fraction is not None:  # given here or stored with the scorer
        mode += f", floor {config.min_fraction:.0%}"
    namm = run(maker(CacheSpec(scorer=loaded.scorer, budget=budget, config=config)), f"NAMM ({mode})", "namm")
    bar.update(1)
    rows = [full, namm]
    baseline_config = config.replace(max_tokens=None).own_rule()  # baselines run their own rules
    # A fraction budget applies at eviction rounds; the tokens appended since the last round are all held, so a
    # baseline given the scorer's measured kept fraction would end up holding more than the scorer did. Probe
    # the budget -> kept map once (teacher-forced, cheapest policy) and solve for the budget that matches.
    target = max(1e-3, min(1.0, namm["kept_fraction"]))
    probe = evaluate_examples(model, tokenizer, examples,
                              lambda: CacheSpec(policy="streaming_llm", budget=target, config=baseline_config).build(model),
                              chunk=chunk)
    fraction = matched_budget(target, target, mean_kept_fraction(probe))
    for policy in baselines:
        rows.append(run(maker(CacheSpec(policy=policy, budget=fraction, config=baseline_config)),
                        f"{policy} (budget {fraction:.1%})", policy))
        bar.update(1)
    protection = baseline_config.replace(**config.selection_rules())
    for policy in protected_baselines:
        spec = CacheSpec(policy=policy, budget=fraction, config=protection)
        rows.append(run(maker(spec), f"{policy} + {protected_label(spec.config)} (budget {fraction:.1%})", f"{policy}+protected"))
        rows[-1]["protected"] = {name: value for name, value in spec.config.selection_rules().items()
                                 if value or name in PROTECTION}  # spreading only where set
        bar.update(1)
    if oracle and with_evidence:
        def oracle_cache(example: Example):
            positions = example.evidence_positions(tokenizer)
            return CacheSpec(policy="oracle", policy_kwargs={"positions": positions}, budget=fraction,
                             config=baseline_config).build(model)

        rows.append(run(oracle_cache, f"oracle (ceiling, budget {fraction:.1%})", "oracle", with_evidence))
        bar.update(1)
    bar.close()
    full_scores = {task: np.asarray(values) for task, values in full["scores"].items()}
    for row in rows:
        row["normalized_mean"] = float(_normalized_means({t: np.asarray(v) for t, v in row["scores"].items()},
                                                         {t: full_scores[t] for t in row["scores"]}))
    result = {"scorer": str(scorer_path), "scorer_weights": weights_digest(loaded.scorer), "no_cap": no_cap,
              "budget": budget, "recent_window": recent_window, "min_fraction": min_fraction, "tokens": tokens,
              "tasks": heldout_tasks(tokens), "prompts_per_task": prompts_per_task, "seed": HELDOUT_SEED,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows,
              "depths": evidence_depths(examples, tokenizer)}
    best = best_baseline(rows, baselines, protected_baselines)
    if best is not None:
        gate = paired_bootstrap({t: np.asarray(v) for t, v in namm["scores"].items()},
                                {t: np.asarray(v) for t, v in best["scores"].items()}, full_scores,
                                resamples=resamples, seed=seed)
        result["gate"] = {"baseline": best["policy"], "baseline_label": best["label"], **gate}
    return result


SAME_SCORE_RTOL = 1e-4  # two runs of one cache on one prompt differ by float rounding across library builds (~1e-6)


def same_scores(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    """Whether two rows' `scores` (`{task: [per-prompt score]}`) are one cache's scores of the same prompts: the same
    tasks, as many prompts each, every score equal within a relative `SAME_SCORE_RTOL` (rounding between runs)."""
    if set(a) != set(b):
        return False
    return all(len(a[task]) == len(b[task]) and np.allclose(a[task], b[task], rtol=SAME_SCORE_RTOL, atol=0.0) for task in a)


def best_baseline(rows: list[dict[str, Any]], baselines: list[str], protected_baselines: list[str]) -> dict[str, Any] | None:
    """The row the gate compares NAMM with: the highest `normalized_mean` among the baselines run by their own rules
    (`policy` in `baselines`) and those run with the scorer's protection (`"<name>+protected"`); never the full
    cache, NAMM or the oracle. None when no such row exists."""
    contenders = set(baselines) | {f"{policy}+protected" for policy in protected_baselines}
    candidates = [row for row in rows if row["policy"] in contenders]
    return max(candidates, key=lambda row: row["normalized_mean"]) if candidates else None


def protected_label(config: NAMMConfig) -> str:
    """What a protected baseline shares with the scorer, for labels: `4 sinks, 64 recent` (`, 4 neighbours`,
    `, smoothing 8`)."""
    label = f"{config.sinks} sinks, {config.recent_window} recent"
    label += f", {config.neighbours} neighbours" if config.neighbours else ""
    return label + (f", smoothing {config.smoothing}" if config.smoothing else "")


def check_baselines(name: str, policies: Any) -> list[str]:
    """`policies` as a list of baseline names (`ACCEPTED_BASELINES`; a comma-separated string is split), each once."""
    if isinstance(policies, str):
        policies = [part.strip() for part in policies.split(",") if part.strip()]
    policies = list(policies)
    unknown = [policy for policy in policies if policy not in ACCEPTED_BASELINES]
    if unknown:
        raise ValueError(f"{name}: unknown baseline(s) {unknown}; choose from {ACCEPTED_BASELINES}.")
    if len(set(policies)) != len(policies):
        raise ValueError(f"{name}: a baseline is named twice in {policies}.")
    return policies


def evidence_depths(examples: list[Example], tokenizer: Any) -> dict[str, list[float]]:
    """`{task: [depth per prompt]}` for the single-needle tasks (pass key, needle): where the needle's first token
    lies in the prompt, as a fraction of the prompt's tokens (0 = first token), prompts in suite order."""
    from namm_cache.tasks.base import token_ids

    depths: dict[str, list[float]] = {}
    for example in examples:
        if example.task in DEPTH_TASKS and example.evidence:
            first = min(example.evidence_positions(tokenizer))
            depths.setdefault(example.task, []).append(first / token_ids(tokenizer, example.prompt).shape[-1])
    return depths


def depth_table(result: dict[str, Any], bins: int = DEPTH_BINS) -> str | None:
    """Greedy accuracy by needle depth (`bins` equal slices of the prompt), one row per cache, as Markdown:
    `correct/prompts` per slice and task. None for results that carry no depths or per-prompt answers."""
    depths = {task: values for task, values in result.get("depths", {}).items() if values}
    rows = [row for row in result["rows"] if row.get("correct")]
    if not depths or not rows:
        return None
    edges = [i / bins for i in range(bins + 1)]
    slices = [f"{edges[i]:.0%}-{edges[i + 1]:.0%}" for i in range(bins)]
    header = [f"{task} {label}" for task in depths for label in slices]
    lines = ["| cache | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for row in rows:
        cells = []
        for task, values in depths.items():
            answers = row["correct"].get(task)
            if answers is None or len(answers) != len(values):
                cells += ["\u2013"] * bins
                continue
            for i in range(bins):
                inside = [ok for depth, ok in zip(values, answers)
                          if edges[i] <= depth < edges[i + 1] or (i == bins - 1 and depth == 1.0)]
                cells.append(f"{sum(inside)}/{len(inside)}" if inside else "\u2013")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_line(result: dict[str, Any]) -> str | None:
    """One line: NAMM - best baseline with its interval, and the ratio; None for results without a gate."""
    gate = result.get("gate")
    if not gate:
        return None
    coverage = f"{gate['confidence']:.0%}"
    return (f"NAMM \u2212 best baseline ({gate['baseline']}): {gate['difference']:+.3f}, {coverage} CI "
            f"[{gate['low']:+.3f}, {gate['high']:+.3f}]; NAMM / {gate['baseline']}: {gate['ratio']:.3f}, {coverage} CI "
            f"[{gate['ratio_low']:.3f}, {gate['ratio_high']:.3f}] (paired bootstrap over {result['prompts_per_task']} "
            f"prompts/task, {gate['resamples']} resamples)")


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table, then the gate's line (results written before the gate have none)."""
    tasks = list(result["rows"][0]["per_task"])
    lines = ["| cache | kept | normalised mean | " + " | ".join(tasks) + " |", "|---|---:|---:|" + "---:|" * len(tasks)]
    partial = False
    for row in result["rows"]:
        cells = []
        for task in tasks:
            entry = row["per_task"].get(task)
            if entry is None:
                cells.append("\u2013")
                continue
            cells.append(f"{entry['score']:.3f}" + (f" ({entry['accuracy']:.0%})" if "accuracy" in entry else ""))
        mark = "*" if len(row["per_task"]) < len(tasks) else ""
        partial = partial or bool(mark)
        lines.append(f"| {row['label']} | {row['kept_fraction']:.0%} | {row['normalized_mean']:.3f}{mark} | " + " | ".join(cells) + " |")
    if partial:
        lines += ["", "\\* over the tasks whose prompts carry evidence (the needle sentences) only."]
    line = gate_line(result)
    if line:
        lines += ["", line]
    depth = depth_table(result)
    if depth:
        lines += ["", "Greedy answers correct by needle depth (where the needle's first token lies in the prompt):", "", depth]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m namm_cache.evolution.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorer", required=True, help="a scorer folder or name")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts-per-task", default=str(GATE_PROMPTS_PER_TASK),
                        help=f"held-out prompts per task (default {GATE_PROMPTS_PER_TASK}, the gate's minimum)")
    parser.add_argument("--no-cap", action="store_true", help="run the scorer with its threshold only (no max_tokens)")
    parser.add_argument("--budget", help="run the scorer under a fraction budget in (0, 1] (its top F; no max_tokens)")
    parser.add_argument("--recent-window", help="replace the scorer's stored recent window (positions kept whatever "
                                                  "their score) by this many")
    parser.add_argument("--min-fraction", help="a floor under the threshold, in (0, 1]: keep at least the top F of the "
                        "tokens seen (NAMMConfig.min_fraction; not with --budget)")
    parser.add_argument("--tokens", default="1000", help="prompt length of the held-out suite (default 1000, the gate's)")
    parser.add_argument("--resamples", default=str(RESAMPLES), help=f"bootstrap resamples (default {RESAMPLES})")
    parser.add_argument("--bootstrap-seed", default="0", help="the bootstrap's numpy seed (default 0)")
    parser.add_argument("--no-oracle", action="store_true", help="leave out the oracle (ceiling) row")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="comma-separated baselines run by their own rules (default: every published one; "
                             "pooled_key_norm, this project's rule, on request)")
    parser.add_argument("--protected-baselines", default="",
                        help="comma-separated baselines also run with the scorer's sinks and recent window (default: none)")
    parser.add_argument("--out", required=True, help="results JSON")
    args = parser.parse_args(argv)

    def fail(error: BaseException) -> int:
        print(f"evaluate: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2

    try:  # every flag is checked before the model loads
        if args.no_cap and args.budget is not None:
            raise ValueError("--no-cap and --budget choose two different modes; give one.")
        prompts = check_int("--prompts-per-task", _number("--prompts-per-task", args.prompts_per_task), minimum=1)
        budget = None if args.budget is None else check_float("--budget", _number("--budget", args.budget), above=0.0, maximum=1.0)
        resamples = check_int("--resamples", _number("--resamples", args.resamples), minimum=1)
        floor = (None if args.min_fraction is None else
                 check_float("--min-fraction", _number("--min-fraction", args.min_fraction), above=0.0, maximum=1.0))
        if floor is not None and args.budget is not None:
            raise ValueError("--min-fraction is a floor under the threshold; --budget sets its own count.")
        tokens = check_int("--tokens", _number("--tokens", args.tokens), minimum=MIN_SUITE_TOKENS, maximum=MAX_TOKEN_COUNT)
        recent = (None if args.recent_window is None else
                  check_int("--recent-window", _number("--recent-window", args.recent_window), minimum=0,
                            maximum=MAX_TOKEN_COUNT))
        baselines = check_baselines("--baselines", args.baselines)
        protected = check_baselines("--protected-baselines", args.protected_baselines)
        if not baselines and not protected:
            raise ValueError("--baselines and --protected-baselines name no baseline: the gate needs at least one.")
        seed = check_int("--bootstrap-seed", _number("--bootstrap-seed", args.bootstrap_seed), minimum=0)
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir():
            raise ValueError(f"--out {args.out!r} must be a file in an existing folder.")
        loaded = load_scorer(args.scorer)
        if args.no_cap and loaded.config.threshold is None:
            raise ValueError(f"{args.scorer} has no score threshold: --no-cap would keep every token.")
        if protected and not (loaded.config.sinks or (loaded.config.recent_window if recent is None else recent)):
            raise ValueError(f"{args.scorer} protects no tokens: --protected-baselines would repeat the plain baselines.")
    except (ValueError, OSError) as error:  # ScorerLoadError is a ValueError
        return fail(error)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from .run import load_model

    try:
        model, tokenizer = load_model(args.model)
    except (ValueError, OSError) as error:
        return fail(error)
    result = evaluate_heldout(model, tokenizer, args.scorer, prompts_per_task=prompts, policies=baselines,
                              protected_policies=protected, no_cap=args.no_cap, budget=budget, recent_window=recent,
                              oracle=not args.no_oracle, resamples=resamples, seed=seed, min_fraction=floor, tokens=tokens)
    result["model"] = args.model
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


def _number(flag: str, text: str) -> float:
    """A flag's text as a number (ints stay exact), or a `ValueError` naming the flag."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{flag} must be a number, got {text!r}.") from None


if __name__ == "__main__":
    raise SystemExit(main())
