"""RULER's offline tasks through lm-eval's `namm` model: full cache, NAMM and the baselines, side by side.

    python benchmarks/ruler.py                                         # SmolLM2-135M-Instruct, 1024 tokens
    python benchmarks/ruler.py --scorer runs/smollm2-bam/scorer --samples 10 --budgets 0.25,0.5

Every cell (policy, budget) runs the pack's `namm_ruler_*` tasks (RULER's generators, seeded, so every
policy sees the same prompts) with lm-eval's `simple_evaluate` on one loaded model, and is written to
`benchmarks/results/ruler_<tag>.json` as soon as it finishes; a rerun skips finished cells. A NAMM scorer
with a calibrated threshold also runs at that threshold (its own memory use). Scores are RULER's
string_match_all; `kept` is the mean fraction of real tokens the cache held at the end of each request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm.auto import tqdm

from namm_cache.hub import DEFAULT_SCORER, load_scorer
from namm_cache.policies import BASELINE_POLICIES
from namm_cache.offline import OFFLINE_MODELS, ensure_converted

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, scorer_id  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ["namm_ruler_niah_single_1", "namm_ruler_niah_multikey_2", "namm_ruler_niah_multikey_3",
         "namm_ruler_vt", "namm_ruler_cwe", "namm_ruler_fwe"]
BASELINES = list(BASELINE_POLICIES)


def run_cell(model_dir: str, model, tokenizer, task_manager, settings: dict, **namm_args) -> dict:
    from lm_eval import simple_evaluate

    from namm_cache.lm_eval_model import NAMMLM

    lm = NAMMLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu",
                update_interval=settings["update_interval"], **namm_args)
    started = time.perf_counter()
    output = simple_evaluate(model=lm, tasks=settings["tasks"], task_manager=task_manager, limit=settings["samples"],
                             metadata={"pretrained": model_dir, "samples": settings["samples"],
                                       "max_seq_lengths": [settings["length"]]})
    scores = {task: output["results"][task]["string_match,none"] for task in settings["tasks"]}
    return {"scores": scores, "mean": sum(scores.values()) / len(scores), "kept": lm.mean_kept_fraction,
            "seconds": round(time.perf_counter() - started, 1)}


def summarize(result: dict) -> None:
    rows = sorted(result["cells"].items(), key=lambda item: -item[1]["mean"])
    for name, cell in rows:
        tasks = " ".join(f"{task.removeprefix('namm_ruler_')}={score:.2f}" for task, score in cell["scores"].items())
        print(f"{name:>22}  mean {cell['mean']:.3f}  kept {cell['kept']:.2f}  {tasks}")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="offline model name or model folder")
    parser.add_argument("--scorer", default=DEFAULT_SCORER)
    parser.add_argument("--tag", default="smollm2")
    parser.add_argument("--length", type=int, default=1024, help="RULER max_seq_length")
    parser.add_argument("--samples", type=int, default=10, help="samples per task")
    parser.add_argument("--budgets", default="0.25,0.5")
    parser.add_argument("--update-interval", type=int, default=128)
    parser.add_argument("--policies", default=",".join(["namm", *BASELINES]))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = str(ensure_converted(args.model)) if args.model in OFFLINE_MODELS else args.model
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ruler_{args.tag}.json"
    budgets = [float(b) for b in args.budgets.split(",")]
    settings = {"model": args.model, "length": args.length, "samples": args.samples,
                "update_interval": args.update_interval, "tasks": args.tasks.split(",")}
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("settings") != settings:
        result = {"settings": settings, "cells": {}}  # different settings: start over
    sid = scorer_id(args.scorer)  # path + content hash: a re-exported scorer reruns its cells
    result.update(scorer=sid, **provenance(__file__, argv))

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task_manager = TaskManager(include_path=str(Path(__file__).resolve().parent.parent / "src/namm_cache/lm_eval_tasks"))
    loaded = load_scorer(args.scorer)
    cells: list[tuple[str, dict]] = [("full", {"policy": "full"})]
    for policy in args.policies.split(","):
        if policy == "namm":
            if loaded.scorer.constant_score() is not None:
                continue  # a constant scorer only keeps the newest tokens: streaming_llm covers it
            if loaded.config.threshold is not None:  # its own memory use: the threshold alone, no cap
                cells.append(("namm@threshold", {"policy": "namm", "scorer": args.scorer, "budget": "threshold", "max_tokens": None}))
            cells += [(f"namm@{b}", {"policy": "namm", "scorer": args.scorer, "budget": b, "max_tokens": None}) for b in budgets]
        else:
            cells += [(f"{policy}@{b}", {"policy": policy, "budget": b}) for b in budgets]
    bar = tqdm(cells, desc=f"ruler {args.tag}")
    for name, namm_args in bar:
        done = result["cells"].get(name)
        if done is not None and (namm_args["policy"] != "namm" or done.get("scorer") == sid):
            continue
        bar.set_postfix_str(name)
        cell = run_cell(model_dir, model, tokenizer, task_manager, settings, **namm_args)
        cell.update(policy=namm_args["policy"], budget=namm_args.get("budget"),
                    scorer=sid if namm_args["policy"] == "namm" else None)
        result["cells"][name] = cell
        path.write_text(json.dumps(result, indent=2))
    summarize(result)
    path.write_text(json.dumps(result, indent=2))
    return path


if __name__ == "__main__":
    main()
