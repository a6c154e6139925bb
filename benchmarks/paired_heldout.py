"""Compare the NAMM rows (or any rows) of two held-out evaluations of the same prompts: paired bootstrap of A minus B.

    python benchmarks/paired_heldout.py A.json B.json [--a-row POLICY] [--b-row POLICY] [--out FILE]
    python benchmarks/paired_heldout.py benchmarks/results/heldout_pooled_start_threshold.json \
        benchmarks/results/heldout_threshold15_threshold.json

Each JSON is written by `python -m namm_cache.evolution.evaluate`. An ablation (one scorer with and without an
input) is judged on the same prompts, so the two results must share model, seed, tasks and prompt count, and
their full-cache rows must agree prompt by prompt; otherwise the comparison is refused (exit status 2, one
`error:` line). The interval is `evaluate.paired_bootstrap`'s: within every task, the same resampled prompts
for A, B and the full cache. `--a-row` / `--b-row` pick another row by its policy (default `namm`), e.g.
`--b-row pooled_key_norm+protected` to judge a scorer against a rule measured in B's run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def pick_row(result: dict[str, Any], policy: str, which: str) -> dict[str, Any]:
    """The row of `result` whose policy is `policy` (`namm`: the scorer's), or a ValueError naming the rows there."""
    rows = [row for row in result["rows"] if row["policy"] == policy]
    if not rows:
        raise ValueError(f"{which} has no {policy!r} row; its rows: {[row['policy'] for row in result['rows']]}.")
    return rows[0]


def compare(a: dict[str, Any], b: dict[str, Any], *, resamples: int = 10000, seed: int = 0, a_row: str = "namm",
            b_row: str = "namm") -> dict[str, Any]:
    """`paired_bootstrap` of A's `a_row` row (default its NAMM row) against B's `b_row`, with both kept fractions."""
    from namm_cache.evolution.evaluate import paired_bootstrap, same_scores

    for key in ("model", "seed", "tasks", "prompts_per_task"):
        if a.get(key) != b.get(key):
            raise ValueError(f"the two results were not measured on the same prompts: {key} {a.get(key)!r} != {b.get(key)!r}.")
    full_a, full_b = a["rows"][0], b["rows"][0]
    if full_a["policy"] != "full" or full_b["policy"] != "full" or not same_scores(full_a["scores"], full_b["scores"]):
        raise ValueError("the full-cache rows differ: the two results were not measured on the same prompts and model.")
    row_a, row_b = pick_row(a, a_row, "A"), pick_row(b, b_row, "B")
    scores = [{task: np.asarray(values) for task, values in row["scores"].items()} for row in (row_a, row_b, full_a)]
    gate = paired_bootstrap(*scores, resamples=resamples, seed=seed)
    return {"a": a.get("scorer"), "b": b.get("scorer"), "a_label": row_a["label"], "b_label": row_b["label"],
            "a_normalized_mean": row_a["normalized_mean"], "b_normalized_mean": row_b["normalized_mean"],
            "a_kept": row_a["kept_fraction"], "b_kept": row_b["kept_fraction"], **gate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="held-out result JSON of scorer A")
    parser.add_argument("b", help="held-out result JSON of scorer B, on the same prompts")
    parser.add_argument("--a-row", default="namm", help="the policy of A's row to compare (default: namm)")
    parser.add_argument("--b-row", default="namm", help="the policy of B's row to compare (default: namm)")
    parser.add_argument("--out", help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    try:
        results = [json.loads(Path(path).read_text()) for path in (args.a, args.b)]
        comparison = compare(*results, a_row=args.a_row, b_row=args.b_row)
    except (OSError, ValueError, KeyError, IndexError) as error:
        print(f"paired_heldout: error: {error}", file=sys.stderr)
        return 2
    print(f"A {comparison['a']} ({comparison['a_label']}): {comparison['a_normalized_mean']:.3f} at {comparison['a_kept']:.1%} kept")
    print(f"B {comparison['b']} ({comparison['b_label']}): {comparison['b_normalized_mean']:.3f} at {comparison['b_kept']:.1%} kept")
    print(f"A - B: {comparison['difference']:+.4f}, 95% CI [{comparison['low']:+.4f}, {comparison['high']:+.4f}]; "
          f"A / B: {comparison['ratio']:.4f} [{comparison['ratio_low']:.4f}, {comparison['ratio_high']:.4f}] "
          f"({comparison['resamples']} paired resamples)")
    if args.out:
        Path(args.out).write_text(json.dumps({"a_file": args.a, "b_file": args.b, **comparison}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
