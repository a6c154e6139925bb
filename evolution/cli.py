"""`namm-evolve`: evolve a NAMM scorer with CMA-ES from a YAML / TOML config.

    namm-evolve --config evolution/configs/smollm2.yaml --out runs/smollm2             # start
    namm-evolve --config evolution/configs/smollm2.yaml --out runs/smollm2 --resume    # continue after a stop
    torchrun --nproc_per_node 2 -m namm_cache.evolution.cli --config ... --out ...     # shard members over ranks
    namm-evolve ... --set population=8 --set stages.0.generations=3                    # overrides
    namm-evolve --config ... --out runs/smollm2 --export DIR [--generation G|best]     # write a scorer only

Every generation is checkpointed atomically to OUT/checkpoint.safetensors (data only: arrays plus a JSON
header), logged to OUT/log.jsonl and plotted to OUT/fitness.png; the final distribution mean is written as a
loadable scorer folder OUT/scorer. The checkpoint also keeps the mean of every validated generation, so
`--export` can write the one that scored best on the fixed validation prompts (`--generation best`). A fresh
start refuses a non-empty OUT (--resume continues the run in it, --overwrite starts it over); --resume without
a checkpoint is an error. User errors (config, folder, checkpoint) exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="namm-evolve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or TOML run config (defaults if omitted)")
    parser.add_argument("--out", required=True, help="run folder: checkpoint, log, plot, scorer")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.safetensors")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a non-empty OUT, deleting its run files (checkpoint, log, plot, config.json, scorer/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (dotted keys, YAML values); repeatable")
    parser.add_argument("--export", metavar="FOLDER", help="only write the scorer of OUT's latest checkpoint to FOLDER")
    parser.add_argument("--generation", metavar="G|best",
                        help="with --export: the distribution mean validated at generation G, or 'best' (highest "
                             "validation fitness in the last validated stage), instead of the latest")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    generation = args.generation
    if generation is not None:
        if not args.export:
            parser.error("--generation goes with --export")
        if generation != "best":
            if not (generation.isascii() and generation.isdigit()):
                parser.error(f"--generation must be a generation number (0, 1, ...) or 'best', got {generation!r}")
            generation = int(generation)

    from .checkpoint import (CheckpointError, check_run_folder, locate_checkpoint, read_checkpoint, unkept_validations,
                             validated_generation)
    from .config import EvolutionConfig
    from .run import EvolutionRun, World

    def fail(error: BaseException) -> int:
        print(f"namm-evolve: error: {error}", file=sys.stderr)
        return 2

    user_errors = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, CheckpointError)
    try:
        config = EvolutionConfig.load(args.config, args.overrides)  # every config check happens here, before any work
        if args.export:
            state = read_checkpoint(locate_checkpoint(args.out))  # missing or unusable: say so before loading the model
            if generation is not None:
                chosen = validated_generation(state, generation)  # "best" becomes its generation
                unkept = unkept_validations(state)
                if generation == "best" and unkept:
                    print(f"namm-evolve: note: 'best' chose among the means this checkpoint keeps; generations "
                          f"{', '.join(map(str, unkept))} were validated before means were kept", file=sys.stderr)
                generation = chosen
        elif os.environ.get("RANK", "0") == "0":
            check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)  # ... and the run folder
    except user_errors as error:
        return fail(error)
    world = World.from_environment()
    try:
        run = EvolutionRun(config, args.out, world=world, progress=not args.no_progress and not args.export)
    except user_errors as error:  # e.g. a prompt longer than the context window of a model not converted before
        return fail(error)
    try:
        if args.export:
            folder = run.export_checkpoint(args.export, generation)
            which = "the latest checkpoint" if generation is None else f"the mean validated at generation {generation}"
            print(f"exported {which} of {args.out} to {folder}")
            return 0
        state = run.run(resume=args.resume, overwrite=args.overwrite)
    except user_errors as error:  # the folder changed since the check above, or the checkpoint does not fit the config
        return fail(error)
    if world.is_main:
        last = state.log[-1] if state.log else {}
        print(f"done: {state.generation} generations, distribution-mean fitness {last.get('fitness_distribution_mean')}, "
              f"scorer in {os.path.join(args.out, 'scorer')}")
    if world.size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
