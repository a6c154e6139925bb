"""Score a scorer on a run config's validation set with one of its parameters set to each given value.

    python tools/weight_sweep.py CONFIG SCORER INDEX VALUE [VALUE ...] [--out FILE]
    python tools/weight_sweep.py evolution/configs/smollm2-linear-pooled.yaml runs/smollm2-linear-pooled-start 27 0 -0.75

A cheap line search before evolution: a new input added with weight 0 to an evolved scorer gets a starting
weight from the validation set (never the held-out one). Each value is scored exactly, as the run's own
validation scores its distribution mean (`EvolutionRun.validate_mean`: stage 0's validation prompts, the
memory term included), printed as one JSON line and, with `--out`, written as a list. Bad arguments exit
with status 2 and one `error:` line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="evolution run config (YAML / TOML)")
    parser.add_argument("scorer", help="scorer folder or name whose parameters are the starting point")
    parser.add_argument("index", type=int, help="index of the parameter to vary in get_flat_params() order")
    parser.add_argument("values", type=float, nargs="+", help="values to give it")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    from namm_cache.evolution.config import EvolutionConfig
    from namm_cache.evolution.run import EvolutionRun
    from namm_cache.hub import ScorerLoadError, load_scorer

    with tempfile.TemporaryDirectory() as folder:  # the run's folder: nothing is written there
        try:
            config = EvolutionConfig.load(args.config)
            if not config.validation_prompts_per_task:
                raise ValueError(f"{args.config} has no validation set (validation_prompts_per_task is 0).")
            start = load_scorer(args.scorer).scorer
            kind = config.scorer.get("kind", "bam")
            if start.kind != kind:
                raise ValueError(f"{args.scorer} is a {start.kind} scorer; the config evolves a {kind} scorer.")
            if not 0 <= args.index < start.num_parameters():
                raise ValueError(f"index must be in [0, {start.num_parameters() - 1}], got {args.index}.")
            run = EvolutionRun(config, folder, progress=False)
            if start.num_parameters() != run.scorer.num_parameters():
                raise ValueError(f"{args.scorer} has {start.num_parameters()} parameters; the config's scorer has "
                                 f"{run.scorer.num_parameters()}.")
        except (ValueError, OSError, ScorerLoadError) as error:
            print(f"weight_sweep: error: {error}", file=sys.stderr)
            return 2
        run.scorer.set_normalization(start.spectrogram_mean, start.spectrogram_std)
        base = start.get_flat_params().double().numpy()
        results = sweep(run, base, args.index, args.values)
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "scorer": args.scorer, "results": results}, indent=2))
    return 0


def sweep(run, base, index: int, values: list[float]) -> list[dict]:
    """Validation results of `base` with parameter `index` set to each of `values`, one JSON line printed each."""
    results = []
    for value in values:
        mean = base.copy()
        mean[index] = value
        began = time.time()
        result = run.validate_mean(mean, 0)
        row = {"index": index, "value": value, "seconds": round(time.time() - began),
               **{key: result[key] for key in ("fitness", "quality", "kept", "per_task", "prompts")}}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


if __name__ == "__main__":
    sys.exit(main())
