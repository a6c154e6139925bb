"""Warm start vs zero start at equal CPU time: the validation curves of two evolution runs, side by side.

    python benchmarks/warm_start.py --runs runs/smollm2-replay runs/smollm2-replay-zero \
        --out benchmarks/results/warm_start.json

Both runs must share their config except `initial_scorer`, and must have run side by side with one thread
each (so a generation's seconds are CPU seconds of one core). The x axis is the cumulative evaluation time
of the generations; the y axis the distribution mean's exact validation score on the fixed validation set
(and, thin, its noisy training fitness). The JSON compares the runs at the largest time both reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402


def read_log(folder: Path) -> list[dict]:
    path = folder / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {folder} an evolution run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(log: list[dict]) -> tuple[list[float], list[dict]]:
    """Cumulative seconds after each generation, and the rows that carry a validation score."""
    elapsed, total = [], 0.0
    for row in log:
        total += row["seconds"]
        elapsed.append(total)
    return elapsed, [dict(row, elapsed=t) for row, t in zip(log, elapsed) if "validation" in row]


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
    horizon = min(curve(log)[0][-1] for log in logs.values() if log) if all(logs.values()) else 0.0
    for (name, log), color in zip(logs.items(), ["tab:blue", "tab:orange", "tab:green", "tab:red"]):
        label = f"{Path(name).name} (start: {configs[name].get('initial_scorer') or 'zero'})"
        elapsed, validated = curve(log)
        axis.plot([t / 60 for t in elapsed], [row["fitness_distribution_mean"] for row in log], color=color, lw=0.7, alpha=0.5)
        axis.plot([row["elapsed"] / 60 for row in validated], [row["validation"]["fitness"] for row in validated], "o-",
                  color=color, lw=2, label=label)
        within = [row for row in validated if row["elapsed"] <= horizon + 1e-9]
        summary[name] = {
            "start": configs[name].get("initial_scorer") or "zero",
            "generations": len(log),
            "minutes": elapsed[-1] / 60 if elapsed else 0.0,
            "validation": [{"generation": row["generation"], "minutes": row["elapsed"] / 60, **row["validation"]} for row in validated],
            "at_common_time": within[-1]["validation"] | {"generation": within[-1]["generation"]} if within else None,
        }
    axis.set_xlabel("evaluation time, minutes of one core")
    axis.set_ylabel("fitness of the distribution mean")
    axis.set_title("thick: exact score on the fixed validation set; thin: training prompts", fontsize=9)
    axis.legend(fontsize=8)
    fig.tight_layout()
    png = args.out.with_suffix(".png")
    fig.savefig(png, dpi=110)
    result = {**provenance(__file__, argv), "common_minutes": horizon / 60, "runs": summary, "plot": str(png)}
    args.out.write_text(json.dumps(result, indent=2))
    for name, entry in summary.items():
        common = entry["at_common_time"]
        shown = f"validation fitness {common['fitness']:.3f} (quality {common['quality']:.3f}, kept {common['kept']:.1%}) at generation {common['generation']}" if common else "no validation yet"
        print(f"{name}: {entry['generations']} generations, {entry['minutes']:.0f} min; at {horizon / 60:.0f} min: {shown}")
    return result


if __name__ == "__main__":
    main()
