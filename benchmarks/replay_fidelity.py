"""Replay fidelity away from the warm start: replayed vs exact fitness of hand-set scorers, same prompts.

    python benchmarks/replay_fidelity.py --out benchmarks/results/replay_fidelity.json

`evolution_throughput.py` checks the replay fitness (`evolution/replay.py`) around the warm start, where
members keep mostly recent tokens. Evolution wanders further. The replay reads keys, values and attention
recorded with the whole prompt in the cache; a scorer that drops a token's local context changes every
later token's keys and hidden states in a real run, which the replay cannot see. This benchmark scores
scorers that differ in how much local context they keep, each exactly and by replay on the same prompts,
with and without the cache's protected tokens (`NAMMConfig.sinks` / `recent_window`), and with the
prompt's end recorded (`replay_refeed: 0`) or fed again through each member's kept tokens (128).

Each candidate is a `bam_norms` scorer whose only non-zero parameters are its read-out (a linear score
of its inputs) plus a large bias, so that every token passes the threshold and the cap ranks them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402

# Read-out weights by input: the age embedding's lowest-frequency sine (index 3 at 8 dims), the first
# spectrogram bin (index 8: the attention a token received), the z-scored log key and value norms (25, 26).
CANDIDATES = {
    "recency": {3: -30.0},
    "attention received": {8: 1.0},
    "low key norm": {25: -1.0},
    "recency + low key norm + high value norm": {3: -30.0, 25: -6.0, 26: 1.0},
}
SETTINGS = {"paper (no protected tokens)": {}, "4 sinks + 128 recent": {"sinks": 4, "recent_window": 128}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="evolution/configs/smollm2-replay.yaml")
    parser.add_argument("--normalization", default="runs/distill-smollm2-norms", help="scorer folder whose spectrogram statistics the candidates use")
    parser.add_argument("--prompts-per-task", type=int, default=4)
    parser.add_argument("--refeeds", default="0,128,512", help="replay_refeed values to compare (comma-separated)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", default="replay-fidelity", help="prompt generator seed (apart from training and validation draws)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import random

    from namm_cache import NAMMCache
    from namm_cache.evolution.config import EvolutionConfig
    from namm_cache.evolution.run import EvolutionRun
    from namm_cache.tasks import build_task

    torch.set_num_threads(args.threads)
    rows = []
    for setting, protection in SETTINGS.items():
        overrides = ["scorer.kind=bam_norms", f"initial_scorer={args.normalization}", "validation_baselines=[]", f"threads={args.threads}"]
        overrides += [f"namm.{key}={value}" for key, value in protection.items()]
        config = EvolutionConfig.load(args.config, overrides)
        run = EvolutionRun(config, "/nonexistent-unused", progress=False)
        normalization = NAMMCache.from_pretrained(args.normalization, model=run.model).scorer
        run.scorer.set_normalization(normalization.spectrogram_mean, normalization.spectrogram_std)
        rng = random.Random(args.seed)
        examples = []
        for spec in config.all_tasks(0):
            examples += build_task(spec).sample(run.tokenizer, rng, args.prompts_per_task)
        members = []
        for weights in CANDIDATES.values():
            run.scorer.set_flat_params(torch.zeros(run.scorer.num_parameters()))
            with torch.no_grad():
                for index, weight in weights.items():
                    run.scorer.readout.weight[0, index] = weight
                run.scorer.readout.bias[0] = 50.0
            members.append(run.scorer.get_flat_params().double().numpy())
        refeeds = [int(value) for value in args.refeeds.split(",")]
        tables = {("replay", refeed): [] for refeed in refeeds}
        tables["exact"] = []
        for example in tqdm(examples, desc=setting):
            for refeed in refeeds:
                run.config.replay_refeed = refeed
                tables[("replay", refeed)].append(run.replay_example(members, example, 0))
            tables["exact"].append(torch.stack([run.exact_score(None, example, 0)] + [run.exact_score(m, example, 0) for m in members]))
        summaries = {name: run.summarize(torch.stack(table, dim=1), examples, 0) for name, table in tables.items()}
        for i, candidate in enumerate(CANDIDATES):
            exact_fitness = summaries["exact"]["fitness"][i]
            for refeed in refeeds:
                replay = summaries[("replay", refeed)]
                row = {"setting": setting, "candidate": candidate, "replay_refeed": refeed,
                       "replay_fitness": replay["fitness"][i], "exact_fitness": exact_fitness,
                       "replay_kept": replay["kept"][i], "exact_kept": summaries["exact"]["kept"][i]}
                row["gap"] = row["replay_fitness"] - exact_fitness
                rows.append(row)
                print(f"{setting:>28} | {candidate:>42} | refeed {refeed:>3} | replay {row['replay_fitness']:.3f} "
                      f"exact {exact_fitness:.3f} gap {row['gap']:+.3f} | kept {row['exact_kept']:.3f}", flush=True)
    result = {**provenance(__file__, argv), "config": args.config, "prompts": len(examples), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
