"""`namm-evolve`: evolve a NAMM scorer with CMA-ES from a YAML / TOML config.

    namm-evolve --config evolution/configs/smollm2.yaml --out runs/smollm2            # start
    namm-evolve --config evolution/configs/smollm2.yaml --out runs/smollm2 --resume   # continue after a stop
    torchrun --nproc_per_node 2 -m evolution.cli --config ... --out ...               # shard members over ranks
    namm-evolve ... --set population=8 --set stages.0.generations=3                   # overrides

Every generation is checkpointed atomically to OUT/checkpoint.pkl, logged to OUT/log.jsonl and plotted
to OUT/fitness.png; the final distribution mean is written as a loadable scorer folder OUT/scorer.
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
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pkl")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (dotted keys, YAML values); repeatable")
    parser.add_argument("--export", metavar="FOLDER", help="only write the scorer of OUT's latest checkpoint to FOLDER")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from .config import EvolutionConfig
    from .run import EvolutionRun, World

    try:
        config = EvolutionConfig.load(args.config, args.overrides)  # every check happens here, before any work
    except (ValueError, FileNotFoundError) as error:
        print(f"namm-evolve: error: {error}", file=sys.stderr)
        return 2
    world = World.from_environment()
    if args.export:
        try:
            folder = EvolutionRun(config, args.out, progress=False).export_checkpoint(args.export)
        except FileNotFoundError as error:
            print(f"namm-evolve: error: {error}", file=sys.stderr)
            return 2
        print(f"exported the latest checkpoint of {args.out} to {folder}")
        return 0
    try:
        run = EvolutionRun(config, args.out, world=world, progress=not args.no_progress)
        state = run.run(resume=args.resume)
    except FileExistsError as error:
        print(f"namm-evolve: error: {error}", file=sys.stderr)
        return 2
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
