"""Bundle an evolved scorer into the package, with its held-out results in the model card.

    python tools/bundle_evolved.py SCORER HELDOUT [MORE_HELDOUT ...] NAME
    python tools/bundle_evolved.py runs/smollm2-bam/scorer benchmarks/results/heldout_smollm2.json namm-cache/smollm2-135m-bam

Each HELDOUT is a JSON written by `python -m namm_cache.evolution.evaluate` for this scorer; the card's results
table is rendered from all of them, one `setting` column telling them apart. Evaluations of one setting whose
full-cache and NAMM rows hold the same per-prompt scores (one suite split across runs, e.g. one per core) are
merged: their full and NAMM rows appear once, and the card's gate line compares NAMM with the best baseline of all
of them (recomputed with `evaluate.paired_bootstrap`, the first run's resamples and seed), plus the best
published baseline where the best is a protected one. The first one decides the settings
the bundled scorer is stored with, so that loading it by name reproduces that evaluation: evaluated with
`--no-cap`, it is stored without its training cap (`max_tokens`) and keeps what its threshold keeps; evaluated
with `--recent-window W`, it is stored with that window. A `--budget` evaluation cannot come first: a budget is
chosen per cache (`CacheSpec(budget=...)`), not stored with the scorer. Bad arguments exit with status 2 and one
`error:` line: among them a HELDOUT of other weights than SCORER's (by the weights digest evaluate records, or
by folder for older results), of another model, seed or prompt set than the first, and a NAME not of the form
`org/name`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from namm_cache.evolution.evaluate import same_scores
from namm_cache.hub import LoadedScorer, bundled_root, load_scorer, resolve, save_scorer, weights_digest

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
SAME_SUITE = ("model", "seed", "prompts_per_task", "tasks")  # what must match across the evaluations of one card


def setting(heldout: dict[str, Any]) -> str:
    """How the scorer ran in one evaluation, in words: `threshold`, `budget 23%`, `stored settings`, plus the window."""
    if heldout.get("no_cap"):
        text = "threshold"
    elif heldout.get("budget") is not None:
        text = f"budget {heldout['budget']:.0%}"
    else:
        text = "stored settings"
    window = heldout.get("recent_window")
    return text if window is None else f"{text}, {window} recent"


def read_heldout(path: str, scorer_folder: str, loaded: LoadedScorer) -> dict[str, Any]:
    """One held-out JSON, refused unless it is an evaluation of these weights (`loaded`, from `scorer_folder`)."""
    try:
        heldout = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable held-out JSON ({error}).") from None
    if not isinstance(heldout, dict) or not isinstance(heldout.get("rows"), list) or not isinstance(heldout.get("scorer"), str):
        raise ValueError(f"{path}: not written by `python -m namm_cache.evolution.evaluate` (no rows or scorer).")
    if "scorer_weights" in heldout:
        same = heldout["scorer_weights"] == weights_digest(loaded.scorer)
    else:  # results written before evaluate recorded the weights: the same folder
        try:
            same = resolve(heldout["scorer"])[0].resolve() == resolve(scorer_folder)[0].resolve()
        except Exception:  # noqa: BLE001 - a scorer that no longer resolves is not this one
            same = False
    if not same:
        raise ValueError(f"{path} evaluated {heldout['scorer']!r}, other weights than {scorer_folder!r}: its results "
                         "would describe another scorer.")
    return heldout


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__)
        return 0
    if len(args) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    scorer_folder, paths, name = args[0], args[1:-1], args[-1]
    try:
        if not NAME.fullmatch(name) or ".." in name or name.endswith(".json"):
            raise ValueError(f"NAME must look like org/name (the name it loads by), got {name!r}.")
        loaded = load_scorer(scorer_folder)
        results = [read_heldout(path, scorer_folder, loaded) for path in paths]
        first = results[0]
        if first.get("budget") is not None:
            raise ValueError(f"{paths[0]} ran the scorer under a fraction budget, which is not stored with a scorer: "
                             "name a --no-cap or stored-settings evaluation first.")
        for path, heldout in zip(paths[1:], results[1:]):
            differ = [key for key in SAME_SUITE if heldout.get(key) != first.get(key)]
            if differ:
                raise ValueError(f"{path} differs from {paths[0]} in {', '.join(differ)}: one card's table holds "
                                 "evaluations of one prompt suite on one model.")
        results = merge_splits(results)
        metadata = card_metadata(loaded, results)
        config, note = stored_config(loaded, first)
        metadata.description += note
    except (ValueError, OSError, KeyError, TypeError, StopIteration) as error:
        print(f"error: {error!r}" if isinstance(error, (KeyError, StopIteration)) else f"error: {error}", file=sys.stderr)
        return 2
    target = bundled_root() / name
    save_scorer(target, loaded.scorer, config, metadata, repo_id=name)
    plot = Path(scorer_folder) / "fitness.png"
    if plot.is_file():
        shutil.copy(plot, target / "fitness.png")
    else:
        (target / "fitness.png").unlink(missing_ok=True)  # a plot left from an earlier bundle under this name
    print(f"bundled {scorer_folder} as {name} in {target}")
    return 0


SINGLE_ROWS = ("full", "namm")  # rows every evaluation of a suite repeats; the others are its baselines and the oracle


def merge_splits(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`results` with each evaluation merged into the first earlier one of the same setting whose full-cache and NAMM
    rows hold the same per-prompt scores (`evaluate.same_scores`: up to rounding): its other rows (baselines, oracle) join that one's. Evaluations that differ
    there stay apart. Every gate is then taken again over its evaluation's rows (`regate`)."""
    merged: list[dict[str, Any]] = []
    for heldout in results:
        home = next((earlier for earlier in merged if setting(earlier) == setting(heldout) and _same_suite_rows(earlier, heldout)),
                    None)
        if home is None:
            merged.append({**heldout, "rows": list(heldout["rows"])})
            continue
        known = {row["policy"] for row in home["rows"]}
        rows = home["rows"] + [row for row in heldout["rows"] if row["policy"] not in known]
        home["rows"] = [row for row in rows if row["policy"] != "oracle"] + [row for row in rows if row["policy"] == "oracle"]
        home["date"] = f"{home['date']}, {heldout['date']}"
    for heldout in merged:
        if all(isinstance(row, dict) and "policy" in row and "scores" in row for row in heldout["rows"]):
            regate(heldout)  # results written before rows named their policy keep the gate they carry
    return merged


def _row(heldout: dict[str, Any], policy: str) -> dict[str, Any] | None:
    return next((row for row in heldout["rows"] if isinstance(row, dict) and row.get("policy") == policy), None)


def _same_suite_rows(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether both evaluations have full-cache and NAMM rows with the same per-prompt scores (older results,
    whose rows name no policy, never merge)."""
    pairs = [(_row(a, policy), _row(b, policy)) for policy in SINGLE_ROWS]
    return all(x is not None and y is not None and "scores" in x and "scores" in y and same_scores(x["scores"], y["scores"])
               for x, y in pairs)


def regate(heldout: dict[str, Any]) -> None:
    """Set `heldout["gate"]` to NAMM against its best baseline (any row but full, NAMM and the oracle, as evaluate
    chooses) and, where that one is a protected baseline, `heldout["published_gate"]` to NAMM against the best
    baseline run by its own rule: paired bootstraps with the recorded gate's resamples and seed (evaluate's
    defaults where none was recorded)."""
    from namm_cache.evolution.evaluate import RESAMPLES, paired_bootstrap

    contenders = [row for row in heldout["rows"] if row["policy"] not in (*SINGLE_ROWS, "oracle")]
    if not contenders:
        return
    old = heldout.get("gate") or {}
    settings = {"resamples": old.get("resamples", RESAMPLES), "seed": old.get("seed", 0)}
    full, namm = (_row(heldout, policy) for policy in SINGLE_ROWS)
    if full is None or namm is None:
        return
    full, namm = full["scores"], namm["scores"]

    def gate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        best = max(rows, key=lambda row: row["normalized_mean"])
        return {"baseline": best["policy"], "baseline_label": best["label"],
                **paired_bootstrap(namm, best["scores"], full, **settings)}

    heldout["gate"] = gate(contenders)
    published = [row for row in contenders if not row["policy"].endswith("+protected")]
    if published and heldout["gate"]["baseline"].endswith("+protected"):
        heldout["published_gate"] = gate(published)


def card_metadata(loaded: LoadedScorer, results: list[dict[str, Any]]):
    """The scorer's metadata with every evaluation's rows as card results and what they measured in the description."""
    metadata = loaded.metadata
    first = results[0]
    metadata.results = [
        {"setting": setting(heldout), "cache (held-out prompts)": row["label"], "kept": f"{row['kept_fraction']:.0%}",
         "normalised score": round(row["normalized_mean"], 3),
         **{task: round(entry["accuracy" if "accuracy" in entry else "score"], 3) for task, entry in row["per_task"].items()}}
        for heldout in results for row in heldout["rows"]
    ]
    dates = ", ".join(dict.fromkeys(heldout["date"] for heldout in results))
    metadata.description += (
        f" Held-out evaluation (`python -m namm_cache.evolution.evaluate`, {dates}): KJV Proverbs haystacks, seed "
        f"{first['seed']}, {first['prompts_per_task']} prompts per task; retrieval columns are greedy accuracy, "
        "long_text is the answer probability; the normalised score is the mean over tasks of the teacher-forced answer "
        "probability divided by the full cache's (the oracle's over the tasks with evidence only); each baseline runs "
        "at the fraction budget under which it holds what the scorer held."
    )
    for heldout in results:
        if heldout.get("gate"):
            gate = heldout["gate"]
            metadata.description += (
                f" At `{setting(heldout)}`: NAMM minus the best baseline ({gate['baseline']}) "
                f"{gate['difference']:+.3f}, 95% paired-bootstrap interval [{gate['low']:+.3f}, {gate['high']:+.3f}]; "
                f"ratio {gate['ratio']:.3f} [{gate['ratio_low']:.3f}, {gate['ratio_high']:.3f}]"
            )
            published = heldout.get("published_gate")
            if published:
                metadata.description += (
                    f"; minus the best baseline run by its own rule ({published['baseline']}) {published['difference']:+.3f} "
                    f"[{published['low']:+.3f}, {published['high']:+.3f}], ratio {published['ratio']:.3f} "
                    f"[{published['ratio_low']:.3f}, {published['ratio_high']:.3f}]"
                )
            metadata.description += "."

    return metadata


def stored_config(loaded: LoadedScorer, first: dict[str, Any]):
    """`(config, note)`: the settings the first evaluation ran the scorer with (its window; without the cap after
    --no-cap), and the sentences that tell the card's reader how they differ from the trained ones."""
    config, note = loaded.config, ""
    if first.get("recent_window") is not None and first["recent_window"] != config.recent_window:
        note += (f" Stored with {first['recent_window']} recent positions protected (trained with "
                 f"{config.recent_window}), as evaluated.")
        config = config.replace(recent_window=first["recent_window"])
    if first.get("no_cap") and config.max_tokens is not None:
        namm_row = next(row for row in first["rows"] if row["label"].startswith("NAMM"))
        note += (f" Stored without its training cap (max_tokens {config.max_tokens}): it keeps what its threshold keeps "
                 f"({namm_row['kept_fraction']:.0%} on the held-out prompts); pass `max_tokens=` to cap it.")
        config = config.replace(max_tokens=None)
    return config, note


if __name__ == "__main__":
    sys.exit(main())
