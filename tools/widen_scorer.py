"""Give an evolved linear scorer one more input, at a chosen weight: the warm start of a richer scorer kind.

    python tools/widen_scorer.py SOURCE KIND OUT [--weight W] [--only-new] [--bias B] [--neighbours K] [--smoothing M]
        [--description TEXT]
    python tools/widen_scorer.py runs/smollm2-linear-lengths/scorer linear_all_layers runs/smollm2-linear-all-layers-start

KIND must read what SOURCE reads plus one input (`linear` -> `linear_pooled` or `linear_all_layers`). The
widened scorer keeps SOURCE's weights, bias, spectrogram statistics, settings and training tasks; the new
input gets weight W (default 0: the same scores as SOURCE wherever the new input is finite). Pick W with
`tools/weight_sweep.py` on a run's validation set. `--only-new` zeroes SOURCE's weights instead, so the new
input alone scores (with `--weight -1` on `linear_all_layers`: the `pooled_key_norm` rule as a scorer, whose
threshold `--bias B` sets); SOURCE still gives the statistics and settings. `--bias` replaces SOURCE's bias,
`--neighbours K` and `--smoothing M` the stored `NAMMConfig.neighbours` and `.smoothing`. Bad arguments exit with status 2 and one `error:` line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def widen(source, kind: str, weight: float, *, only_new: bool = False, bias: float | None = None):
    """A scorer of `kind` whose read-out is `source`'s with one more column (the new input's weight `weight`);
    with `only_new`, `source`'s columns are zero; `bias` replaces `source`'s bias."""
    import torch
    from torch import nn

    from namm_cache.scorers import SCORER_KINDS

    if kind not in SCORER_KINDS:
        raise ValueError(f"unknown scorer kind {kind!r}; known: {sorted(SCORER_KINDS)}.")
    target_class = SCORER_KINDS[kind]
    # The source must be exactly the target's parent kind: a read-out alone (BAM's sits behind an attention
    # block) is not the scorer, and a copied one would not score as the source did.
    parent = target_class.__mro__[1]
    if type(source) is not parent or tuple(target_class.extra_inputs[:-1]) != tuple(source.extra_inputs) \
            or not isinstance(getattr(source, "readout", None), nn.Linear):
        raise ValueError(f"only a linear scorer widens, to linear_pooled or linear_all_layers; got a {source.kind} "
                         f"scorer and kind {kind}.")
    target = target_class(input_dim=source.input_dim + 1, n_bins=source.n_bins)
    with torch.no_grad():
        target.readout.weight[:, : source.input_dim] = 0.0 if only_new else source.readout.weight
        target.readout.weight[:, source.input_dim] = weight
        target.readout.bias.copy_(source.readout.bias if bias is None else torch.full_like(source.readout.bias, bias))
    target.set_normalization(source.spectrogram_mean, source.spectrogram_std)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="scorer folder or name to widen")
    parser.add_argument("kind", help="the scorer kind to widen it to (linear_pooled, linear_all_layers)")
    parser.add_argument("out", help="folder to write the widened scorer to")
    parser.add_argument("--weight", type=float, default=0.0, help="the new input's weight (default 0)")
    parser.add_argument("--only-new", action="store_true", help="zero SOURCE's weights: the new input alone scores")
    parser.add_argument("--bias", type=float, default=None, help="replace SOURCE's bias (the threshold's offset)")
    parser.add_argument("--neighbours", type=int, default=None, help="the stored NAMMConfig.neighbours (default: SOURCE's)")
    parser.add_argument("--smoothing", type=int, default=None, help="the stored NAMMConfig.smoothing (default: SOURCE's)")
    parser.add_argument("--description", default="", help="what the card says the scorer is")
    args = parser.parse_args(argv)
    import math

    from namm_cache.hub import ScorerLoadError, ScorerMetadata, load_scorer, save_scorer

    try:
        for flag, value in (("--weight", args.weight), ("--bias", args.bias)):
            if value is not None and (not math.isfinite(value) or abs(value) > 1e6):
                raise ValueError(f"{flag} must be a finite number within +-1e6, got {value}.")
        if Path(args.out).exists() and any(Path(args.out).iterdir()):
            raise ValueError(f"{args.out} exists and is not empty; choose a new folder.")
        loaded = load_scorer(args.source)
        changes = {name: value for name, value in (("neighbours", args.neighbours), ("smoothing", args.smoothing)) if value is not None}
        config = loaded.config.replace(**changes)
        scorer = widen(loaded.scorer, args.kind, args.weight, only_new=args.only_new, bias=args.bias)
    except (ValueError, OSError, ScorerLoadError) as error:
        print(f"widen_scorer: error: {error}", file=sys.stderr)
        return 2
    description = args.description or (f"{args.source} widened to the {args.kind} kind; the new input "
                                        f"({scorer.extra_inputs[-1]}) has weight {args.weight:g}"
                                        + (", every other weight 0" if args.only_new else "")
                                        + ("" if args.bias is None else f", bias {args.bias:g}") + ".")
    metadata = ScorerMetadata(base_models=loaded.metadata.base_models, training_tasks=loaded.metadata.training_tasks,
                              license=loaded.metadata.license, description=description)
    try:
        save_scorer(args.out, scorer, config, metadata)
    except OSError as error:
        print(f"widen_scorer: error: cannot write {args.out}: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {scorer.kind}, {scorer.num_parameters()} parameters, new input weight {args.weight:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
