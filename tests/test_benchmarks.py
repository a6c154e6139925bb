"""The comparison benchmark runs end to end on a tiny model, writes JSON and PNGs, and resumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_compare_runs_end_to_end_and_skips_finished_cells(tmp_path, tiny_model_dir):
    import compare

    args = ["--model", str(tiny_model_dir), "--tag", "tiny", "--tokens", "150", "--prompts", "1", "--budgets", "0.5",
            "--update-interval", "32", "--policies", "namm,h2o,streaming_llm", "--scorer", "namm-cache/keep-all",
            "--out-dir", str(tmp_path)]
    path = compare.main(args)
    result = json.loads(path.read_text())
    assert set(result["cells"]) == {"full", "namm@0.5", "h2o@0.5", "streaming_llm@0.5"}
    for name, cell in result["cells"].items():
        assert set(cell["per_task"]) == {"passkey", "needle", "variable_tracking", "long_text"}
        assert 0 < cell["kept_fraction"] <= 1 and "score" in cell
    assert result["cells"]["full"]["kept_fraction"] == 1.0
    assert result["cells"]["h2o@0.5"]["kept_fraction"] < 0.9
    for png in ("compare_tiny_quality.png", "compare_tiny_cost.png"):
        assert (tmp_path / png).stat().st_size > 1000
    seconds = {name: cell["seconds"] for name, cell in result["cells"].items()}
    compare.main(args)  # every cell is done: nothing reruns
    again = json.loads(path.read_text())
    assert {name: cell["seconds"] for name, cell in again["cells"].items()} == seconds
    # Another scorer in a folder (same path, new weights later): only NAMM cells rerun, each time the weights change.
    from helpers import random_scorer

    from namm_cache import NAMMConfig
    from namm_cache.hub import save_scorer

    folder = tmp_path / "scorer"
    save_scorer(folder, random_scorer(seed=1), NAMMConfig(update_interval=32))
    with_folder = [{"namm,h2o,streaming_llm": "namm,h2o", "namm-cache/keep-all": str(folder)}.get(a, a) for a in args]
    first = json.loads(compare.main(with_folder).read_text())["cells"]
    save_scorer(folder, random_scorer(seed=2), NAMMConfig(update_interval=32))
    second = json.loads(compare.main(with_folder).read_text())["cells"]
    assert first["h2o@0.5"]["seconds"] == second["h2o@0.5"]["seconds"] == seconds["h2o@0.5"]
    assert first["namm@0.5"]["scorer"] != second["namm@0.5"]["scorer"] != again["cells"]["namm@0.5"]["scorer"]
    assert second["namm@0.5"]["scorer"].startswith(f"{folder}@")


def test_ruler_benchmark_runs_end_to_end_and_skips_finished_cells(tmp_path, tiny_model_dir):
    import ruler

    args = ["--model", str(tiny_model_dir), "--tag", "tiny", "--samples", "1", "--budgets", "0.5", "--policies", "h2o",
            "--tasks", "namm_ruler_niah_single_1,namm_ruler_vt", "--out-dir", str(tmp_path)]
    path = ruler.main(args)
    result = json.loads(path.read_text())
    assert set(result["cells"]) == {"full", "h2o@0.5"}
    for cell in result["cells"].values():
        assert set(cell["scores"]) == {"namm_ruler_niah_single_1", "namm_ruler_vt"}
        assert all(0.0 <= score <= 1.0 for score in cell["scores"].values())
    assert result["cells"]["full"]["kept"] == 1.0
    assert 0.4 < result["cells"]["h2o@0.5"]["kept"] < 0.75  # half of each ~1k prompt, plus what was generated since
    assert result["command"].startswith("python benchmarks/ruler.py --model")
    seconds = {name: cell["seconds"] for name, cell in result["cells"].items()}
    ruler.main(args)  # every cell is done: nothing reruns
    assert {name: cell["seconds"] for name, cell in json.loads(path.read_text())["cells"].items()} == seconds
