"""Warm start vs zero start at equal CPU time: the validation curves of two evolution runs, side by side.

    python benchmarks/warm_start.py --runs runs/smollm2-replay runs/smollm2-replay-zero \
        --out benchmarks/results/warm_start.json

Both runs must share their config except `initial_scorer` and run side by side with one thread each: a
generation then costs both the same CPU time (same population, prompts and replay work; the JSON reports
each run's median seconds per generation to show it), so generations are the common time axis (wall
seconds are not: a paused run's pause counts in them). The y axis is the distribution mean's exact
validation score on the fixed validation set (thick) and its noisy training fitness (thin). The JSON
compares the runs at the last validated generation both reached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402


def read_log(folder: Path) -> list[dict]:
    path = folder / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {folder} an evolution run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def validated(log: list[dict]) -> list[dict]:
    """The rows that carry a validation score."""
    return [row for row in log if "validation" in row]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="JSON to write; the PNG goes beside it")
    args = parser.parse_args(argv)
    try:
        logs = {str(folder): read_log(folder) for folder in args.runs}
        configs = {str(folder): json.loads((folder / "config.json").read_text()) for folder in args.runs}
    except (FileNotFoundError, json.JSONDecodeError) as error:
        print(f"warm_start: error: {error}", file=sys.stderr)
        sys.exit(2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    summary = {}
    horizon = min(len(log) for log in logs.values())
    for (name, log), color in zip(logs.items(), ["tab:blue", "tab:orange", "tab:green", "tab:red"]):
        label = f"{Path(name).name} (start: {configs[name].get('initial_scorer') or 'zero'})"
        rows = validated(log)
        axis.plot([row["generation"] for row in log], [row["fitness_distribution_mean"] for row in log], color=color, lw=0.7, alpha=0.5)
        axis.plot([row["generation"] for row in rows], [row["validation"]["fitness"] for row in rows], "o-", color=color, lw=2, label=label)
        within = [row for row in rows if row["generation"] < horizon]
        summary[name] = {
            "start": configs[name].get("initial_scorer") or "zero",
            "generations": len(log),
            # CPU seconds where the log has them (wall seconds also count a paused run's pause)
            "median_seconds_per_generation": statistics.median(row.get("cpu_seconds", row["seconds"]) for row in log) if log else None,
            "validation": [{"generation": row["generation"], **row["validation"]} for row in rows],
            "at_common_generation": within[-1]["validation"] | {"generation": within[-1]["generation"]} if within else None,
        }
    axis.set_xlabel("generation (equal CPU time per generation in both runs)")
    axis.set_ylabel("fitness of the distribution mean")
    axis.set_title("thick: exact score on the fixed validation set; thin: training prompts (replayed)", fontsize=9)
    axis.legend(fontsize=8)
    fig.tight_layout()
    png = args.out.with_suffix(".png")
    fig.savefig(png, dpi=110)
    result = {**provenance(__file__, argv), "common_generations": horizon, "runs": summary, "plot": str(png)}
    args.out.write_text(json.dumps(result, indent=2))
    for name, entry in summary.items():
        common = entry["at_common_generation"]
        shown = (f"validation fitness {common['fitness']:.3f} (quality {common['quality']:.3f}, kept {common['kept']:.1%}) "
                 f"at generation {common['generation']}") if common else "no validation yet"
        median = entry["median_seconds_per_generation"]
        print(f"{name}: {entry['generations']} generations, median {median or 0:.0f} s each; {shown}")
    return result


if __name__ == "__main__":
    main()
