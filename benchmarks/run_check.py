"""A run's distribution mean against its validation baselines on fresh prompts, with a paired bootstrap interval.

    python benchmarks/run_check.py --run runs/smollm2-linear --prompts-per-task 16 \
        --baselines streaming_llm,h2o --out benchmarks/results/run_check_linear.json

Between the run's small validation curve (a fixed set, scored every few generations) and the held-out gate
(`evolution/evaluate.py`: other text, 30 prompts per task, every baseline, hours of CPU), this scores the
latest checkpoint's mean exactly on a larger fresh draw of the stage's own tasks (the training text, a
generator no training, validation or held-out draw uses), beside each `validation_baselines` policy at the
stage's cap, and reports the paired bootstrap 95% interval of (mean - baseline) in normalised score. It
is a check of what the validation curve suggests, not the held-out gate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="the run's config (default: the run folder's own config.json)")
    parser.add_argument("--run", required=True, help="the run folder (its checkpoint's distribution mean is scored)")
    parser.add_argument("--prompts-per-task", type=int, default=24)
    parser.add_argument("--seed", default="run-check")
    parser.add_argument("--baselines", default=None, help="comma-separated policies (default: the config's validation_baselines)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from namm_cache.evolution.checkpoint import read_checkpoint
    from namm_cache.evolution.config import EvolutionConfig
    from namm_cache.evolution.evaluate import paired_bootstrap
    from namm_cache.evolution.run import EvolutionRun
    from namm_cache.tasks import build_task

    torch.set_num_threads(args.threads)
    config_path = args.config or str(Path(args.run) / "config.json")
    config = EvolutionConfig.load(config_path, [f"threads={args.threads}"])
    state = read_checkpoint(Path(args.run) / "checkpoint.safetensors")
    run = EvolutionRun(config, "/nonexistent-unused", progress=True)
    run.scorer.set_normalization(torch.tensor(state.normalization[0]), torch.tensor(state.normalization[1]))
    stage = state.stage
    if state.stage_generation == 0 and stage > 0:  # the stage just began: its mean was evolved on the previous one
        stage -= 1
    if config.namm_config(stage).max_tokens is None:
        raise SystemExit(f"Stage {stage} has no cap (max_tokens): the baselines would have no budget to match. "
                         "Check a capped stage's checkpoint.")
    baselines = args.baselines.split(",") if args.baselines else list(config.validation_baselines)
    rng = random.Random(args.seed)
    examples = [e for spec in config.all_tasks(stage) for e in build_task(spec).sample(run.tokenizer, rng, args.prompts_per_task)]

    def per_task(table: torch.Tensor) -> dict[str, list[float]]:
        scores: dict[str, list[float]] = {}
        for example, (score, _) in zip(examples, table.tolist()):
            scores.setdefault(example.task, []).append(score)
        return scores

    full = run.exact_scores(None, examples, stage)
    mean = run.exact_scores(state.es.mean, examples, stage)
    rows = {"mean": {"kept": float(mean[:, 1].mean()), "scores": per_task(mean)}}
    for baseline in baselines:
        table = run.exact_scores(baseline, examples, stage)
        rows[baseline] = {"kept": float(table[:, 1].mean()), "scores": per_task(table)}
    full_scores = per_task(full)
    for name, row in rows.items():
        row["normalized"] = float(np.mean([np.mean(row["scores"][t]) / np.mean(full_scores[t]) for t in full_scores]))
        print(f"{name:>14}: normalised {row['normalized']:.3f} at {row['kept']:.1%} kept", flush=True)
    intervals = {}
    for baseline in baselines:
        intervals[baseline] = paired_bootstrap(rows["mean"]["scores"], rows[baseline]["scores"], full_scores,
                                               resamples=args.resamples, seed=0)
        b = intervals[baseline]
        print(f"mean - {baseline}: {b['difference']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}]; "
              f"ratio {b['ratio']:.2f} [{b['ratio_low']:.2f}, {b['ratio_high']:.2f}]", flush=True)
    result = {**provenance(__file__, argv), "config": config_path, "run": args.run, "generation": state.generation,
              "stage": stage, "prompts": len(examples), "full_scores": full_scores, "rows": rows, "intervals": intervals}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
