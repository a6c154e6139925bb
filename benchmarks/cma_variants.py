"""Full vs separable (diagonal) CMA-ES at the BAM scorer's size (4,172 dims), population 8.

    python benchmarks/cma_variants.py

A cheap stand-in for the real fitness: a noisy, ill-conditioned ellipsoid in 4,172 dims (per-coordinate
scales spanning 1e-2..1e2, like scorer weights that matter very differently), maximised from the
scorer's zero start with sigma0 0.065. Reports progress after N generations, time per generation and
checkpoint size (pickled strategy). It says whether the variant's mechanics help at this size; the real
fitness is far noisier and costlier, so it does not replace a run on it.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from namm_cache.evolution.run import CMAES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402

DIM, POPULATION, SIGMA0, GENERATIONS = 4172, 8, 0.065, 150


def main() -> None:
    rng = np.random.default_rng(0)
    scales = 10 ** rng.uniform(-2, 2, DIM)
    target = rng.normal(0, 0.05, DIM)

    def fitness(x, noise_rng):
        return -float(np.sum((scales * (x - target)) ** 2)) * (1 + 0.05 * noise_rng.standard_normal())

    rows = {}
    for separable in (False, True):
        np.random.seed(0)
        noise = np.random.default_rng(1)
        es = CMAES(np.zeros(DIM), SIGMA0, POPULATION, seed=0, separable=separable)
        start = fitness(es.mean, np.random.default_rng(2))
        began = time.perf_counter()
        for _ in range(GENERATIONS):
            solutions = es.ask()
            es.tell(solutions, [fitness(x, noise) for x in solutions])
        seconds = (time.perf_counter() - began) / GENERATIONS
        rows["separable" if separable else "full"] = {
            "fitness_start": start,
            "fitness_after": fitness(es.mean, np.random.default_rng(2)),
            "improvement_ratio": start / fitness(es.mean, np.random.default_rng(2)),
            "seconds_per_generation": seconds,
            "checkpoint_megabytes": len(pickle.dumps(es)) / 2**20,
        }
    result = {**provenance(__file__), "dim": DIM, "population": POPULATION, "sigma0": SIGMA0, "generations": GENERATIONS,
              "variants": rows}
    out = Path(__file__).resolve().parent / "results" / "cma_variants.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
