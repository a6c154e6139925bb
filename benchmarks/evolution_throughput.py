"""Evolution throughput: member-prompt evaluations per CPU-minute, the exact loop vs the replay fitness, one run.

    python benchmarks/evolution_throughput.py --out benchmarks/results/evolution_throughput.json

One generation's work twice, on the same members and the same prompts: `fitness: exact` (every member
feeds every prompt through its own cache, plus the full-cache reference) and `fitness: replay` (one
observing full-cache pass per prompt, every member's evictions replayed on it: `evolution/replay.py`).
Members are a population drawn around a scorer (default: the committed distilled warm start) as CMA-ES
draws them, so they evict like a real run's. Besides the speed ratio it reports how faithfully the replay
ranks the members (Spearman correlation of the two fitness vectors, and of the two quality vectors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two equal-length lists (Pearson correlation of their ranks; ties get ordinal ranks)."""
    ranks = [np.argsort(np.argsort(np.asarray(values, dtype=float), kind="stable")) for values in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--scorer", default="runs/distill-smollm2", help="centre of the population (a scorer folder)")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--tasks", default="passkey,needle")
    parser.add_argument("--prompts-per-task", type=int, default=2)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.065)
    parser.add_argument("--update-interval", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256, help="cap per (layer, head): 25%% of a 1k prompt")
    parser.add_argument("--refeed", type=int, default=0, help="replay_refeed of the replay pass (prompt tokens fed again per member)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from namm_cache.evolution.config import EvolutionConfig
    from namm_cache.evolution.run import EvolutionRun
    from namm_cache.tasks import TRAINING_TEXT

    settings = {
        "model": args.model, "scorer": {"kind": "bam", "hidden_dim": 32},
        "namm": {"update_interval": args.update_interval, "max_tokens": args.max_tokens},
        "population": args.population, "seed": args.seed, "prompts_per_task": args.prompts_per_task,
        "threads": args.threads, "initial_scorer": args.scorer, "fitness": "replay", "replay_refeed": args.refeed,
        "stages": [{"tasks": [{"name": name, "tokens": args.tokens, "haystack": TRAINING_TEXT} for name in args.tasks.split(",")],
                    "generations": 1}],
    }
    run = EvolutionRun(EvolutionConfig.from_dict(settings), Path("/nonexistent-unused"), progress=True)
    initial = run.config.load_initial_scorer().scorer
    run.scorer.set_normalization(initial.spectrogram_mean, initial.spectrogram_std)
    centre = initial.get_flat_params().double().numpy()
    rng = np.random.default_rng(args.seed)
    members = np.vstack([centre + args.sigma * rng.standard_normal((args.population, run.dim)), centre[None]])
    examples = run.examples_for(0, 0)

    run.config.fitness = "exact"
    exact, exact_wall, exact_cpu = timed(lambda: run.evaluate_generation(members, examples, 0))
    run.config.fitness = "replay"
    replay, replay_wall, replay_cpu = timed(lambda: run.evaluate_generation(members, examples, 0))

    evaluations = len(members) * len(examples)
    result = {
        **provenance(__file__, argv),
        "settings": {key: getattr(args, key) for key in ("model", "scorer", "tokens", "tasks", "prompts_per_task", "population",
                                                         "sigma", "update_interval", "max_tokens", "refeed", "threads", "seed")},
        "member_prompt_evaluations": evaluations,
        "exact": {"wall_s": exact_wall, "cpu_s": exact_cpu, "per_cpu_minute": evaluations / (exact_cpu / 60)},
        "replay": {"wall_s": replay_wall, "cpu_s": replay_cpu, "per_cpu_minute": evaluations / (replay_cpu / 60)},
        "speedup_cpu": exact_cpu / replay_cpu,
        "speedup_wall": exact_wall / replay_wall,
        "fitness_exact": exact["fitness"],
        "fitness_replay": replay["fitness"],
        "kept_exact": exact["kept"],
        "kept_replay": replay["kept"],
        "spearman_fitness": spearman(exact["fitness"], replay["fitness"]),
        "spearman_quality": spearman(exact["quality"], replay["quality"]),
        "full_scores_exact": exact["full_scores"],
        "full_scores_replay": replay["full_scores"],
    }
    print(f"{evaluations} member-prompt evaluations ({len(members)} members x {len(examples)} prompts of {args.tokens} tokens)")
    print(f"exact : {exact_cpu:7.1f} CPU s  {result['exact']['per_cpu_minute']:6.2f} per CPU-minute")
    print(f"replay: {replay_cpu:7.1f} CPU s  {result['replay']['per_cpu_minute']:6.2f} per CPU-minute")
    print(f"speed-up {result['speedup_cpu']:.2f}x CPU time, {result['speedup_wall']:.2f}x wall")
    print(f"fitness rank agreement (Spearman): {result['spearman_fitness']:.3f}; quality {result['spearman_quality']:.3f}")
    print("member  fitness exact  replay   kept exact  replay")
    for i, (a, b, c, d) in enumerate(zip(exact["fitness"], replay["fitness"], exact["kept"], replay["kept"])):
        print(f"{i:>6}  {a:13.3f}  {b:6.3f}   {c:10.3f}  {d:6.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
