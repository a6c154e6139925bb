"""Greedy pass keys and needles by depth on the training text: a cheap probe for choosing a scorer's settings.

    python benchmarks/depth_probe.py --scorer runs/smollm2-rule-smooth8-start --out /tmp/probe.json
    python benchmarks/depth_probe.py --scorer runs/smollm2-rule-smooth8-start \\
        --scorer runs/smollm2-rule-smooth8-start:smoothing=12,p28=-0.1 --baselines streaming_llm --out ...

Each `--scorer` is a scorer folder or name, optionally followed by `:` and comma-separated changes:
`NAME=VALUE` for a setting of its config (`smoothing=12`, `neighbours=0`, `max_tokens=none`, `threshold=0.5`)
and `pINDEX=VALUE` for one of its parameters (`get_flat_params()` order; `p28=-0.1` is the pooled_key_norm
rule's bias). Every scorer runs with its stored settings (cap included, unless `max_tokens=none`) on the same
prompts: pass-key and needle prompts of `--haystack` (default `kjv_genesis`, the training text; never the
held-out `kjv_proverbs`) with the needle of prompt i of n at depth 5% + 90% (i + 0.5) / n, so every fifth of the
prompt gets its share. Each `--baselines` policy runs once per scorer under the fraction budget that holds that
scorer's mean kept fraction (`namm_cache.evolution.evaluate.matched_budget`, solved from one streaming_llm
run of the first prompt: tokens appended since the last eviction round are all held, so a budget of F holds
more than F); the `kept` column shows what each cache held.

It prints, per cache, the mean kept fraction and greedy answers correct by needle depth (where the needle's first
token lies in the prompt), and writes them as JSON. This is a probe on training text for choosing settings
before a validation sweep and a held-out run; it is not a quality claim (16 prompts per task by default, no
interval). Bad flags exit with status 2 and one `error:` line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import output_file, provenance, refuse, task_names  # noqa: E402

TASKS = ("passkey", "needle")


def parse_scorer(text: str) -> tuple[str, dict[str, Any], dict[int, float]]:
    """`PATH[:NAME=VALUE,pINDEX=VALUE,...]` as (path, config changes, parameter changes). Values are ints where
    they read as ints, `none` is None, else floats."""
    if Path(text).exists():  # a folder whose name holds a colon
        return text, {}, {}
    path, _, changes = text.rpartition(":") if ":" in text else (text, "", "")
    if not path:
        raise ValueError(f"--scorer {text!r} names no scorer.")
    config: dict[str, Any] = {}
    params: dict[int, float] = {}
    for part in filter(None, (piece.strip() for piece in changes.split(","))):
        name, equals, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not name or not value:
            raise ValueError(f"--scorer {text!r}: write each change as NAME=VALUE, got {part!r}.")
        if name[0] == "p" and name[1:].isdigit():
            index = int(name[1:])
            if index in params:
                raise ValueError(f"--scorer {text!r}: parameter {name} is changed twice.")
            params[index] = _value(text, value, number_only=True)
            if not math.isfinite(params[index]):
                raise ValueError(f"--scorer {text!r}: {name} must be a finite number, got {value!r}.")
        else:
            config[name] = _value(text, value)
    return path, config, params


def _value(text: str, value: str, number_only: bool = False) -> Any:
    if value.lower() == "none" and not number_only:
        return None
    for kind in (int, float):
        try:
            return float(kind(value)) if number_only else kind(value)
        except ValueError:
            pass
    raise ValueError(f"--scorer {text!r}: {value!r} is not a number{'' if number_only else ' or none'}.")


def load_variant(text: str):
    """The `LoadedScorer` of a `--scorer` spec with its changes applied (a `ValueError` for unknown settings,
    parameter indices out of range or values its config refuses)."""
    from namm_cache.hub import load_scorer

    path, config_changes, param_changes = parse_scorer(text)
    loaded = load_scorer(path)
    if config_changes:
        from namm_cache.hub import _check_compatible

        try:
            loaded.config = loaded.config.replace(**config_changes)
            _check_compatible(loaded.scorer, loaded.config, text)  # e.g. recency_dim changes the scorer's input size
        except (TypeError, ValueError) as error:  # unknown fields name the known ones; bad values say why
            raise ValueError(f"--scorer {text!r}: {error}") from None
    if param_changes:
        flat = loaded.scorer.get_flat_params().clone()
        for index, value in param_changes.items():
            if not 0 <= index < flat.numel():
                raise ValueError(f"--scorer {text!r}: parameter index {index} is outside [0, {flat.numel() - 1}].")
            flat[index] = value
        loaded.scorer.set_flat_params(flat)
    return loaded


def depth_examples(tokenizer, tasks: tuple[str, ...], prompts_per_task: int, tokens: int, haystack: str, seed: str):
    """`prompts_per_task` examples per task, the single needle of prompt i at depth 0.05 + 0.9 (i + 0.5) / n."""
    from namm_cache.tasks import build_task

    rng = random.Random(seed)
    examples = []
    for name in tasks:
        task = build_task({"name": name, "tokens": tokens, "haystack": haystack})
        for i in range(prompts_per_task):
            fields = task.draw(rng)
            (_, sentence), = fields["needles"]
            fields["needles"] = [(0.05 + 0.9 * (i + 0.5) / prompts_per_task, sentence)]
            examples.append(task.render(tokenizer, rng, fields))
    return examples


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorer", action="append", required=True,
                        help="a scorer folder or name, optionally ':NAME=VALUE,pINDEX=VALUE,...' (repeatable)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--baselines", default="", help="comma-separated policies run at each scorer's kept fraction")
    parser.add_argument("--prompts-per-task", default="16")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--tokens", default="1000")
    parser.add_argument("--haystack", default="kjv_genesis", help="the haystack text (default: the training text)")
    parser.add_argument("--seed", default="depth-probe")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--out", required=True, help="results JSON")
    args = parser.parse_args(argv)
    from namm_cache import CacheSpec
    from namm_cache.evolution.evaluate import (DEPTH_BINS, _number, check_baselines, depth_table, evidence_depths,
                                               matched_budget)
    from namm_cache.evolution.fitness import score_and_answer
    from namm_cache.evolution.run import load_model
    from namm_cache.hub import weights_digest
    from namm_cache.tasks import build_task
    from namm_cache.validation import check_int

    try:  # every flag is checked before the model loads
        baselines = check_baselines("--baselines", args.baselines)
        prompts_per_task = check_int("--prompts-per-task", _number("--prompts-per-task", args.prompts_per_task), minimum=1)
        tokens = check_int("--tokens", _number("--tokens", args.tokens), minimum=256)
        threads = check_int("--threads", _number("--threads", args.threads), minimum=1)
        out = output_file("--out", args.out)
        tasks = task_names("--tasks", args.tasks, TASKS)
        for name in tasks:
            build_task({"name": name, "tokens": tokens, "haystack": args.haystack})
        scorers = [(text, load_variant(text)) for text in args.scorer]
    except (ValueError, OSError) as error:  # ScorerLoadError is a ValueError
        return refuse("depth_probe", error)
    torch.set_num_threads(threads)
    try:
        model, tokenizer = load_model(args.model)
    except (ValueError, OSError) as error:
        return refuse("depth_probe", error)
    examples = depth_examples(tokenizer, tasks, prompts_per_task, tokens, args.haystack, args.seed)

    def run(label: str, make_spec, chunk: int) -> dict[str, Any]:
        correct: dict[str, list[bool]] = {}
        kept = []
        for example in tqdm(examples, desc=label, leave=False):
            answer = score_and_answer(model, tokenizer, make_spec().build(model), example, chunk)
            correct.setdefault(example.task, []).append(answer.correct)
            kept.append(answer.kept_fraction)
        return {"label": label, "kept_fraction": sum(kept) / len(kept), "correct": correct,
                "greedy": {task: f"{sum(values)}/{len(values)}" for task, values in correct.items()}}

    rows = []
    for text, loaded in tqdm(scorers, desc="scorers"):
        row = run(text, lambda: CacheSpec(scorer=loaded.scorer, config=loaded.config), loaded.config.update_interval)
        row.update(scorer=text, scorer_weights=weights_digest(loaded.scorer), config=loaded.config.to_dict())
        rows.append(row)
        plain = loaded.config.replace(max_tokens=None).own_rule()
        if baselines:
            target = max(1e-3, row["kept_fraction"])
            probe = score_and_answer(model, tokenizer, CacheSpec(policy="streaming_llm", budget=target, config=plain).build(model),
                                     examples[0], plain.update_interval)
            budget = matched_budget(target, target, probe.kept_fraction)
        for policy in baselines:
            rows.append({**run(f"{policy} (budget {budget:.1%}, beside {text})",
                               lambda: CacheSpec(policy=policy, budget=budget, config=plain), plain.update_interval),
                         "policy": policy, "budget": budget, "beside": text})
    result = {**provenance(__file__, argv), "model": args.model, "tasks": list(tasks), "tokens": tokens,
              "haystack": args.haystack, "seed": args.seed, "prompts_per_task": prompts_per_task,
              "depths": evidence_depths(examples, tokenizer), "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| cache | kept | " + " | ".join(f"{task} greedy" for task in tasks) + " |")
    print("|---|---:|" + "---:|" * len(tasks))
    for row in rows:
        print(f"| {row['label']} | {row['kept_fraction']:.1%} | " + " | ".join(row["greedy"][t] for t in tasks) + " |")
    print(f"\nGreedy answers correct by needle depth ({DEPTH_BINS} slices of the prompt):\n")
    print(depth_table(result))
    return result


if __name__ == "__main__":
    main()
