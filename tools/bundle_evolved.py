"""Bundle an evolved scorer into the package, with its held-out results in the model card.

    python tools/bundle_evolved.py runs/smollm2-bam/scorer benchmarks/results/heldout_smollm2.json namm-cache/smollm2-135m-bam

The card's results table is rendered from the held-out JSON written by
`python -m namm_cache.evolution.evaluate`. The bundled scorer keeps the settings that evaluation used: evaluated with `--no-cap`, it is stored without its
training cap (`max_tokens`), so by default it keeps what its threshold keeps.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from namm_cache.hub import bundled_root, load_scorer, save_scorer


def main() -> None:
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    scorer_folder, heldout_json, name = sys.argv[1:]
    loaded = load_scorer(scorer_folder)
    heldout = json.loads(Path(heldout_json).read_text())
    metadata = loaded.metadata
    metadata.results = [
        {"cache (held-out prompts)": row["label"], "kept": f"{row['kept_fraction']:.0%}",
         "normalised score": round(row["normalized_mean"], 3),
         **{task: round(entry["accuracy" if "accuracy" in entry else "score"], 3) for task, entry in row["per_task"].items()}}
        for row in heldout["rows"]
    ]
    metadata.description += (
        f" Held-out evaluation (`python -m namm_cache.evolution.evaluate`, {heldout['date']}): KJV Proverbs haystacks, seed "
        f"{heldout['seed']}, {heldout['prompts_per_task']} prompts per task; retrieval columns are greedy accuracy, "
        "long_text is the answer probability; the normalised score is the mean over tasks of the teacher-forced answer "
        "probability divided by the full cache's; each baseline runs at the fraction budget under which it holds "
        "what the scorer held."
    )
    target = bundled_root() / name
    config = loaded.config
    if heldout.get("no_cap") and config.max_tokens is not None:
        namm_row = next(row for row in heldout["rows"] if row["label"].startswith("NAMM"))
        metadata.description += (
            f" Stored without its training cap (max_tokens {config.max_tokens}): it keeps what its threshold keeps "
            f"({namm_row['kept_fraction']:.0%} on the held-out prompts); pass `max_tokens=` to cap it."
        )
        config = config.replace(max_tokens=None)
    save_scorer(target, loaded.scorer, config, metadata, repo_id=name)
    plot = Path(scorer_folder) / "fitness.png"
    if plot.is_file():
        shutil.copy(plot, target / "fitness.png")
    print(f"bundled {scorer_folder} as {name} in {target}")


if __name__ == "__main__":
    main()
