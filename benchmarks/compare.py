"""Full cache vs NAMM vs every baseline at several budgets: task score against retained KV, time and peak KV.

    python benchmarks/compare.py                                  # SmolLM2-135M-Instruct, default settings
    python benchmarks/compare.py --model gemma3-270m --tag gemma3 # zero-shot transfer: same scorer, no retraining
    python benchmarks/compare.py --scorer runs/smollm2-bam/scorer # any scorer folder / repo id

The held-out suite (`namm_cache.tasks.heldout_examples`: KJV Proverbs haystacks, a seed never used in
training): pass key, one needle, variable tracking (greedy-answer accuracy) and long-text continuation
(teacher-forced answer probability, normalised by the full cache). Each (policy, budget) cell is written to
the JSON as soon as it finishes and skipped on the next run, so an interrupted benchmark resumes. Outputs, under benchmarks/results/:
`compare_<tag>.json`, `compare_<tag>_quality.png` (score vs kept fraction) and `compare_<tag>_cost.png`
(time and peak KV per policy). The `oracle` line is the ceiling: told where each prompt's needle sentences
are, it keeps them, 4 sinks and the most recent tokens (tasks with a needle only, so its score averages those).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm.auto import tqdm

from namm_cache import CacheSpec
from namm_cache.policies import BASELINE_POLICIES
from namm_cache.evolution.fitness import evaluate_examples, score_and_answer
from namm_cache.evolution.run import load_model
from namm_cache.hub import DEFAULT_SCORER, load_scorer
from namm_cache.tasks import HELDOUT_SEED, heldout_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, scorer_id  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = list(BASELINE_POLICIES)


def run_cell(model, tokenizer, examples, make_cache, chunk: int) -> dict:
    """Score every example with a fresh `make_cache(example)`: long text by its teacher-forced probability,
    the others by greedy-answer accuracy."""
    started = time.perf_counter()
    per_task: dict[str, list[float]] = {}
    peak = 0
    kept = []
    for example in examples:
        cache = make_cache(example)
        if example.task == "long_text" or example.metric != "logprob":
            (result,) = evaluate_examples(model, tokenizer, [example], lambda: cache, chunk=chunk)
            per_task.setdefault(example.task, []).append(result.score)
            kept.append(result.kept_fraction)
            continue
        both = score_and_answer(model, tokenizer, cache, example, chunk)  # one prefill: score and greedy answer
        per_task.setdefault(example.task, []).append(float(both.correct))
        kept.append(both.kept_fraction)
        peak = max(peak, both.prefill_peak_kv_bytes)
    return {
        "per_task": {task: sum(v) / len(v) for task, v in per_task.items()},
        "kept_fraction": sum(kept) / len(kept),
        "peak_kv_bytes": peak,
        "seconds": time.perf_counter() - started,
    }


def summarize(result: dict) -> None:
    """Add each cell's score: mean over tasks, long-text normalised by the full cache."""
    full = result["cells"].get("full")
    if not full:
        return
    for cell in result["cells"].values():
        values = []
        for task, value in cell["per_task"].items():
            if task == "long_text":
                reference = full["per_task"][task]
                values.append(value / reference if reference else 0.0)
            else:
                values.append(value)
        cell["score"] = sum(values) / len(values)


def plot(result: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    policies = sorted({cell["policy"] for cell in cells.values() if cell["policy"] != "full"})
    for policy in policies:
        budgeted = [c for c in cells.values() if c["policy"] == policy and "score" in c and c["budget"] != "threshold"]
        points = sorted((c["kept_fraction"], c["score"]) for c in budgeted)
        if points:
            if policy == "oracle":
                ax.plot(*zip(*points), "s--", color="grey", label="oracle: keeps the needle (ceiling; tasks with a needle)")
            else:
                ax.plot(*zip(*points), "o-", label=f"{policy} (budget)" if policy == "namm" else policy)
    for cell in cells.values():
        if cell["budget"] == "threshold" and "score" in cell:
            ax.plot([cell["kept_fraction"]], [cell["score"]], "*", markersize=14, color="black", label="namm (own threshold)")
    if "full" in cells and "score" in cells["full"]:
        ax.axhline(cells["full"]["score"], color="black", ls="--", label="full cache")
    ax.set_xlabel("mean retained KV fraction")
    ax.set_ylabel("task score (mean over tasks)")
    ax.set_title(f"{result['model']}: held-out tasks, {result['tokens']}-token prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}_quality.png", dpi=110)
    plt.close(fig)

    names = [name for name in cells if cells[name]["budget"] in (None, result["cost_budget"])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.barh(names, [cells[n]["seconds"] for n in names])
    left.set_xlabel("seconds (all prompts)")
    right.barh(names, [cells[n]["peak_kv_bytes"] / 2**20 for n in names])
    right.set_xlabel("peak KV (MiB, prefill)")
    right.set_yticks([])
    fig.suptitle(f"cost at budget {result['cost_budget']}")
    fig.tight_layout()
    fig.savefig(f"{stem}_cost.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--scorer", default=DEFAULT_SCORER)
    parser.add_argument("--tag", default="smollm2")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per task")
    parser.add_argument("--budgets", default="0.1,0.25,0.5")
    parser.add_argument("--update-interval", type=int, default=128)
    parser.add_argument("--policies", default=",".join(["namm", *BASELINES, "oracle"]),
                        help="'oracle' is the ceiling: it keeps each prompt's needle sentences (tasks with a needle only)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"compare_{args.tag}.json"
    budgets = [float(b) for b in args.budgets.split(",")]
    # The seed is part of the settings: cells measured on other prompts (before the one held-out suite) rerun.
    settings = {"model": args.model, "tokens": args.tokens, "prompts_per_task": args.prompts,
                "update_interval": args.update_interval, "seed": HELDOUT_SEED}
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("settings") != settings:
        result = {"settings": settings, "cells": {}}  # different settings: start over
    sid = scorer_id(args.scorer)  # path + content hash: a re-exported scorer reruns its cells
    result.update(scorer=sid, model=args.model, tokens=args.tokens, cost_budget=0.25 if 0.25 in budgets else budgets[0],
                  **provenance(__file__, argv))

    model, tokenizer = load_model(args.model)
    examples = heldout_examples(tokenizer, args.prompts, tokens=args.tokens)
    loaded = load_scorer(args.scorer)
    interval = args.update_interval
    config = loaded.config.replace(update_interval=interval, max_tokens=None)
    cells = [("full", None)]
    for policy in args.policies.split(","):
        cells += [(policy, budget) for budget in budgets]
        if policy == "namm" and loaded.scorer.constant_score() is None:
            cells.append(("namm", "threshold"))
    bar = tqdm(cells, desc=f"compare {args.tag}")
    for policy, budget in bar:
        name = policy if budget is None else f"{policy}@{budget}"
        done = result["cells"].get(name)
        if done is not None and (policy != "namm" or done.get("scorer") == sid):
            continue
        bar.set_postfix_str(name)
        if policy == "oracle":  # told where each prompt's evidence lies: one cache per prompt
            def make(example, budget=budget):
                return CacheSpec(policy="oracle", policy_kwargs={"positions": example.evidence_positions(tokenizer)},
                                 config=config, budget=budget).build(model)

            cell = run_cell(model, tokenizer, [e for e in examples if e.evidence], make, interval)
        else:
            spec = CacheSpec(policy=policy, scorer=loaded.scorer if policy == "namm" else None, config=config, budget=budget)
            cell = run_cell(model, tokenizer, examples, lambda example, spec=spec: spec.build(model), interval)
        cell.update(policy=policy, budget=budget, scorer=sid if policy == "namm" else None)
        result["cells"][name] = cell
        summarize(result)
        path.write_text(json.dumps(result, indent=2))
    summarize(result)
    path.write_text(json.dumps(result, indent=2))
    plot(result, out_dir / f"compare_{args.tag}")
    return path


if __name__ == "__main__":
    main()
