"""Starting points for evolution, scored exactly on an evolution config's validation set (stage 0).

    python benchmarks/starting_points.py --config evolution/configs/smollm2-replay.yaml \
        --out benchmarks/results/starting_points.json

Candidates: a pure recency scorer (the age embedding's lowest-frequency sine, every token above the
threshold so the cap ranks them), the config's `initial_scorer` ranked by the cap, and that scorer plus a
recency prior of weight 10 and 30 (`namm_cache.evolution.distill.add_recency_prior`). The run's
`validation_baselines` on the same prompts are in the run's log (`validation.baselines`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from namm_cache.evolution.config import EvolutionConfig
    from namm_cache.evolution.distill import add_recency_prior
    from namm_cache.evolution.run import EvolutionRun

    torch.set_num_threads(args.threads)
    config = EvolutionConfig.load(args.config, ["validation_baselines=[]", f"threads={args.threads}"])
    if config.initial_scorer is None:
        raise SystemExit("The config needs an initial_scorer to compare against.")
    run = EvolutionRun(config, "/nonexistent-unused", progress=False)
    initial = config.load_initial_scorer().scorer
    run.scorer.set_normalization(initial.spectrogram_mean, initial.spectrogram_std)
    distilled = initial.get_flat_params()
    namm = config.namm_config(0)

    def candidate(base: torch.Tensor, weight: float):
        run.scorer.set_flat_params(base)
        add_recency_prior(run.scorer, weight, namm)
        with torch.no_grad():
            run.scorer.readout.bias += 50.0  # every token passes the threshold: the cap ranks them
        return run.scorer.get_flat_params().double().numpy()

    rows = {}
    for name, vector in [("recency only", candidate(torch.zeros_like(distilled), 1.0)),
                         ("initial scorer, ranked by the cap", candidate(distilled, 0.0)),
                         ("initial scorer + 10 x recency", candidate(distilled, 10.0)),
                         ("initial scorer + 30 x recency", candidate(distilled, 30.0))]:
        scores = run.validate_mean(vector, 0)
        rows[name] = {key: scores[key] for key in ("fitness", "kept", "per_task", "prompts")}
        print(f"{name:>36}: validation fitness {scores['fitness']:.3f} at {scores['kept']:.1%} kept", flush=True)
    result = {**provenance(__file__, argv), "config": args.config, "initial_scorer": config.initial_scorer, "candidates": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
