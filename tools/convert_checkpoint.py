"""Convert an old pickle checkpoint (OUT/checkpoint.pkl) into the data format namm-evolve reads now.

    python tools/convert_checkpoint.py --out runs/smollm2-bam [--config evolution/configs/smollm2.yaml] [--remove-pickle]

Only convert a checkpoint you trust: this reads a pickle. The unpickler admits only the globals an old
checkpoint holds (pycma's classes, numpy's array and generator rebuilders, the run's two classes), which narrows
what a crafted file can do but does not make unpickling safe (an admitted class can be called with crafted
arguments). namm-evolve itself never unpickles.

The CMA-ES settings the old format did not store (sigma0, population, separable, seed) come from the run's
config (`--config`, else OUT/config.json); the sampler's generator state is the private copy pickled with the
strategy, so the converted run continues exactly as resuming the pickle would have. The conversion is checked
before anything is written: the rebuilt strategy has the pickled one's complete state (mean, sigma, covariance,
paths, counters, generator) and draws the same next population.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
from pathlib import Path

import numpy as np
import torch

from namm_cache.evolution.checkpoint import CHECKPOINT, LEGACY_CHECKPOINT, RunState, read_checkpoint, write_checkpoint
from namm_cache.evolution.cmaes import CMAES
from namm_cache.evolution.config import EvolutionConfig


class LegacyRunState:
    """Stands in for the old `evolution.run.RunState` while unpickling (its attributes arrive as a dict); old pickles
    name the module as it was then installed, top-level `evolution`."""


class LegacyCMAES:
    """Stands in for the old `evolution.run.CMAES` (it held only `strategy`)."""


def _randn_of(obj, name):
    """The one `getattr` an old checkpoint needs: the sampler's `RandomState.randn`."""
    if isinstance(obj, np.random.RandomState) and name == "randn":
        return obj.randn
    raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) is not admitted")


def _load_tensor_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


ADMITTED = {
    ("evolution.run", "RunState"): LegacyRunState,
    ("evolution.run", "CMAES"): LegacyCMAES,
    ("builtins", "getattr"): _randn_of,
    ("torch.storage", "_load_from_bytes"): _load_tensor_bytes,
}
ADMITTED_BY_NAME = {
    "numpy": {"ndarray", "dtype"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy.random._pickle": {"__randomstate_ctor", "__bit_generator_ctor", "__generator_ctor"},
    "numpy.random._mt19937": {"MT19937"},
    "numpy.linalg": {"eigh"},
    "collections": {"OrderedDict"},
    "torch._utils": {"_rebuild_tensor_v2"},
    "cma.evolution_strategy": {"CMAEvolutionStrategy", "_CMAStopDict", "_StopTolXStagnation", "_CMASolutionDict_functional", "_pass"},
    "cma.options_parameters": {"CMAOptions", "CMAParameters", "is_feasible"},
    "cma.boundary_handler": {"BoundNone", "BoundTransform"},
    "cma.logger": {"CMADataLogger"},
    "cma.optimization_tools": {"BestSolution"},
    "cma.recombination_weights": {"RecombinationWeights"},
    "cma.sampler": {"GaussStandardConstant", "GaussFullSampler"},
    "cma.sigma_adaptation": {"CMAAdaptSigmaTPA", "CMAAdaptSigmaCSA", "_TPAParameters"},
    "cma.transformations": {"GenoPheno", "DiagonalDecoding", "RoundIntegerVariables"},
    "cma.utilities.utils": {"SolutionDict", "BlancClass", "MoreToWrite", "DictFromTagsInString", "ElapsedWCTime"},
    "cma.integer_centering": {"_pass"},
}


class AdmittingUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ADMITTED:
            return ADMITTED[(module, name)]
        if name in ADMITTED_BY_NAME.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not among the globals an old checkpoint holds; not converting")


def convert(out: Path, config: EvolutionConfig) -> RunState:
    legacy = AdmittingUnpickler(io.BytesIO((out / LEGACY_CHECKPOINT).read_bytes())).load()
    if not isinstance(legacy, LegacyRunState) or not isinstance(legacy.es, LegacyCMAES):
        raise SystemExit(f"{out / LEGACY_CHECKPOINT} does not hold an old RunState")
    strategy = legacy.es.strategy
    generator = strategy.sm.randn.__self__
    if strategy.opts["randn"].__self__ is not generator:
        raise SystemExit("the pickled strategy draws from two generators; cannot convert it exactly")
    old = CMAES.__new__(CMAES)
    old.strategy, old.random = strategy, generator
    old.settings = {"dim": int(np.asarray(strategy.mean).shape[0]), "sigma0": float(config.sigma0),
                    "population": int(config.population), "seed": int(config.seed + legacy.stage), "separable": bool(config.separable)}
    if strategy.sp.popsize != config.population or bool(strategy.opts["CMA_diagonal"]) != config.separable:
        raise SystemExit("the config's population / separable differ from the pickled strategy's; give the run's config")
    tree, arrays = old.state_dict()
    es = CMAES.from_state(json.loads(json.dumps(tree)), arrays)
    check = CMAES.from_state(json.loads(json.dumps(tree)), arrays)
    if json.dumps(check.state_dict()[0]) != json.dumps(tree):
        raise SystemExit("the rebuilt strategy's state differs from the pickled one")
    if not np.array_equal(old.ask(), check.ask()):  # (`old` is not used after this)
        raise SystemExit("the rebuilt strategy draws a different next population than the pickled one")
    return RunState(generation=legacy.generation, stage=legacy.stage, stage_generation=legacy.stage_generation, es=es,
                    normalization=legacy.normalization, log=legacy.log, numpy_rng=legacy.numpy_rng,
                    python_rng=legacy.python_rng, torch_rng=legacy.torch_rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="run folder holding checkpoint.pkl")
    parser.add_argument("--config", help="the run's config (default: OUT/config.json)")
    parser.add_argument("--remove-pickle", action="store_true", help="delete checkpoint.pkl once the conversion is verified")
    args = parser.parse_args()
    if (args.out / CHECKPOINT).exists():
        raise SystemExit(f"{args.out / CHECKPOINT} exists already; not overwriting it")
    if args.config:
        config = EvolutionConfig.load(args.config)
    else:
        config = EvolutionConfig.from_dict(json.loads((args.out / "config.json").read_text()))
    state = convert(args.out, config)
    write_checkpoint(args.out / CHECKPOINT, state)
    reread = read_checkpoint(args.out / CHECKPOINT)
    assert np.array_equal(reread.es.mean, state.es.mean) and reread.es.sigma == state.es.sigma
    print(f"{args.out / CHECKPOINT}: generation {reread.generation}, stage {reread.stage}, "
          f"sigma {reread.es.sigma!r}, mean |x|_2 {float(np.linalg.norm(reread.es.mean))!r}")
    if args.remove_pickle:
        (args.out / LEGACY_CHECKPOINT).unlink()


if __name__ == "__main__":
    main()
