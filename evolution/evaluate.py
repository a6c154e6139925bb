"""Held-out evaluation of an evolved scorer against the full cache and the baselines at the same memory.

    python -m namm_cache.evolution.evaluate --scorer runs/smollm2-bam/scorer --out runs/smollm2-bam/heldout.json

Prompts are the held-out suite (`namm_cache.tasks.heldout_examples`: `kjv_proverbs` haystacks, a seed never
used in training). The scorer runs with
its stored settings (or, with `--no-cap`, with its score threshold alone: its own memory use); every baseline
then runs with the fraction budget under which it holds the scorer's measured mean kept fraction (solved
from one probe run, `matched_budget`), so the comparison is at the same retained KV. Scores are normalised
by the full cache on the same prompts (teacher-forced answer probability; passkey / needle / variable
tracking also report greedy exact-answer accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm.auto import tqdm

from namm_cache import CacheSpec
from namm_cache.policies import BASELINE_POLICIES
from namm_cache.hub import load_scorer
from namm_cache.tasks import HELDOUT_SEED, HELDOUT_TASKS, heldout_examples

from .fitness import answers_correctly, evaluate_examples, mean_kept_fraction

BASELINES = list(BASELINE_POLICIES)  # every registered baseline, in registry order


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


def evaluate_heldout(model, tokenizer, scorer_path: str, *, prompts_per_task: int = 4, policies: list[str] | None = None,
                     progress: bool = True, no_cap: bool = False) -> dict[str, Any]:
    """Full cache, the scorer and every baseline (at the scorer's measured kept fraction) on held-out prompts.

    `no_cap=True` drops the scorer's stored `max_tokens`, so it keeps what its threshold keeps."""
    loaded = load_scorer(scorer_path)
    config = loaded.config.replace(max_tokens=None) if no_cap else loaded.config
    if no_cap and config.threshold is None:
        raise ValueError(f"{scorer_path} has no score threshold: without its cap it would keep every token.")
    chunk = config.update_interval
    examples = heldout_examples(tokenizer, prompts_per_task)

    def run(make_cache, label: str) -> dict[str, Any]:
        results = evaluate_examples(model, tokenizer, examples, make_cache, chunk=chunk)
        accuracy = {}
        for example in examples:
            if example.task == "long_text":
                continue
            accuracy.setdefault(example.task, []).append(answers_correctly(model, tokenizer, make_cache(), example, chunk))
        per_task: dict[str, dict[str, float]] = {}
        for task in dict.fromkeys(e.task for e in examples):
            idx = [i for i, e in enumerate(examples) if e.task == task]
            per_task[task] = {"score": sum(results[i].score for i in idx) / len(idx)}
            if task in accuracy:
                per_task[task]["accuracy"] = sum(accuracy[task]) / len(accuracy[task])
        return {"label": label, "kept_fraction": mean_kept_fraction(results), "per_task": per_task}

    rows = []
    bar = tqdm(total=2 + len(policies or BASELINES), desc="held-out", disable=not progress)
    def maker(spec: CacheSpec):
        return lambda: spec.build(model)

    full = run(maker(CacheSpec(policy="full", config=config)), "full cache")
    bar.update(1)
    mode = "threshold" if no_cap else (f"cap {config.max_tokens}" if config.max_tokens else "stored settings")
    namm = run(maker(CacheSpec(scorer=loaded.scorer, config=config)), f"NAMM ({mode})")
    bar.update(1)
    rows += [full, namm]
    baseline_config = config.replace(max_tokens=None)
    # A fraction budget applies at eviction rounds; the tokens appended since the last round are all held, so a
    # baseline given the scorer's measured kept fraction would end up holding more than the scorer did. Probe
    # the budget -> kept map once (teacher-forced, cheapest policy) and solve for the budget that matches.
    target = max(1e-3, min(1.0, namm["kept_fraction"]))
    probe = evaluate_examples(model, tokenizer, examples,
                              maker(CacheSpec(policy="streaming_llm", budget=target, config=baseline_config)), chunk=chunk)
    fraction = matched_budget(target, target, mean_kept_fraction(probe))
    for policy in policies or BASELINES:
        rows.append(run(maker(CacheSpec(policy=policy, budget=fraction, config=baseline_config)),
                        f"{policy} (budget {fraction:.1%})"))
        bar.update(1)
    bar.close()
    for row in rows:
        normalized = [row["per_task"][t]["score"] / full["per_task"][t]["score"] for t in row["per_task"] if full["per_task"][t]["score"] > 0]
        row["normalized_mean"] = sum(normalized) / len(normalized)
    return {"scorer": str(scorer_path), "no_cap": no_cap, "tasks": HELDOUT_TASKS, "prompts_per_task": prompts_per_task, "seed": HELDOUT_SEED,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}


def table(result: dict[str, Any]) -> str:
    tasks = list(result["rows"][0]["per_task"])
    lines = ["| cache | kept | normalised mean | " + " | ".join(tasks) + " |", "|---|---:|---:|" + "---:|" * len(tasks)]
    for row in result["rows"]:
        cells = []
        for task in tasks:
            entry = row["per_task"][task]
            cells.append(f"{entry['score']:.3f}" + (f" ({entry['accuracy']:.0%})" if "accuracy" in entry else ""))
        lines.append(f"| {row['label']} | {row['kept_fraction']:.0%} | {row['normalized_mean']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorer", required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts-per-task", type=int, default=4)
    parser.add_argument("--no-cap", action="store_true", help="run the scorer with its threshold only (no max_tokens)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from .run import load_model

    model, tokenizer = load_model(args.model)
    result = evaluate_heldout(model, tokenizer, args.scorer, prompts_per_task=args.prompts_per_task, no_cap=args.no_cap)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
