"""Where does a scorer keep the needle? Evidence retention per layer, beside baselines given the same protection.

    python benchmarks/evidence_retention.py --scorer runs/smollm2-linear/scorer --out benchmarks/results/evidence_retention.json

Pass-key and needle prompts of the training text (`kjv_genesis`: the training distribution, drawn from a seed
of its own) go through the scorer at its stored settings and through each baseline run with the scorer's own
protected tokens (its sinks and recent window) inside the same memory: the scorer's cap as a token budget, or
`--budget F` for every cache. The cap is the scorer's most: if its threshold keeps fewer tokens the baselines
hold more, which the `kept` column shows (and a note on stderr). After the prompt, each cache-managed layer
reports

- **evidence retention**: the share of (evidence token, KV head) pairs still held (the needle sentence's
  tokens, `Example.evidence_positions`), and
- **base rate**: the same share for the other tokens the last eviction round decided on (not the first
  `sinks`, not its `recent_window` newest, not those that arrived after it).

The other decided tokens are also split by kind (punctuation and markup against words, `token_groups`) and by
depth in the prompt, each with the share held: what a cache spends its memory on besides the needle.

Retention above the base rate means the cache singles the needle out; at the base rate it keeps the needle
as often as any haystack token. Each prompt is also scored (teacher-forced answer probability over the full
cache's, and the greedy answer) on a fresh cache. The `oracle` row keeps the evidence by construction (a
ceiling: retention 1 where the budget allows). Writes the JSON and a PNG of retention by layer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import output_file, provenance, refuse, task_names  # noqa: E402

TASKS = ("passkey", "needle")  # the default --tasks; variable_tracking also carries evidence (its statements)
EVIDENCE_TASKS = ("passkey", "needle", "variable_tracking")
DEPTH_BINS = 5


def held_shares(positions: torch.Tensor, valid: torch.Tensor, *masks: torch.Tensor) -> tuple[float, ...]:
    """For each mask, the share of its (token, head) pairs that one layer holds (e.g. needle, haystack).

    Args:
        positions, valid: `(H, S)` the layer's slots for one sequence (each head holds its own tokens; slots with
            `valid` False hold nothing, whatever position they carry).
        masks: `(T,)` bool masks over the prompt's positions.

    Returns NaN for a share whose mask is empty."""
    if not masks or len({mask.shape[0] for mask in masks}) != 1:
        raise ValueError(f"Give one or more masks of one length, got lengths {[mask.shape[0] for mask in masks]}.")
    length = masks[0].shape[0]
    held = torch.zeros(positions.shape[0], length, dtype=torch.bool)
    for head in range(positions.shape[0]):
        kept = positions[head][valid[head]].cpu()
        held[head, kept[kept < length]] = True
    return tuple(float(held[:, mask].float().mean()) if mask.any() else float("nan") for mask in masks)


def token_groups(tokenizer, prompt_ids: torch.Tensor, bins: int = DEPTH_BINS) -> dict[str, torch.Tensor]:
    """`(T,)` masks over a prompt `(1, T)`: by kind, `punctuation` (special tokens such as the chat template's
    turn markers, and tokens that decode to punctuation or white space alone: newlines, full stops, commas) and
    `words` (the rest), and by where they lie, `depth a-b%` (`bins` equal slices of the prompt's positions, 1 to
    100). Punctuation is ASCII's (`string.punctuation`): the KJV texts here use no other."""
    if not 1 <= bins <= 100:
        raise ValueError(f"bins must be 1 to 100 (the slices are named by whole percentages), got {bins}.")
    ids = prompt_ids[0].tolist()
    special = set(tokenizer.all_special_ids)
    text = [tokenizer.decode([token]).strip() for token in ids]
    punctuation = torch.tensor([token in special or all(char in string.punctuation for char in word)  # "" counts
                                for token, word in zip(ids, text)])
    groups = {"punctuation": punctuation, "words": ~punctuation}
    length = prompt_ids.shape[1]
    for b in range(bins):
        mask = torch.zeros(length, dtype=torch.bool)
        mask[b * length // bins:(b + 1) * length // bins] = True
        groups[f"depth {100 * b // bins}-{100 * (b + 1) // bins}%"] = mask
    return groups


@torch.no_grad()
def retention_after_prompt(model, cache, prompt_ids: torch.Tensor, evidence: torch.Tensor, chunk: int, *, sinks: int,
                           recent_window: int, groups: dict[str, torch.Tensor] | None = None) -> dict[str, list[float]]:
    """Feed `prompt_ids` `(1, T)` through `cache` in `chunk`-token pieces; per cache-managed layer, the share of
    (evidence token, KV head) pairs held (`evidence`) and the share of the other decided tokens' pairs held (`base`,
    the base rate), and for each of `groups` (name: `(T,)` mask, e.g. `token_groups`) the share of its decided
    non-evidence tokens' pairs held.

    Decided tokens are those the cache's last eviction round chose among: from position `sinks` up to that
    round's recent window (the round at `L` tokens seen protects positions `>= L - recent_window`; tokens that
    arrived after it were never scored). Evidence outside that range is left out of every share."""
    groups = groups or {}
    if {"evidence", "base"} & set(groups):
        raise ValueError("Group names 'evidence' and 'base' are taken by the evidence and base-rate shares.")
    for part in prompt_ids.split(chunk, dim=1):
        model(input_ids=part.to(model.device), cache=cache, use_cache=True)
    length = prompt_ids.shape[1]
    is_evidence = torch.zeros(length, dtype=torch.bool)
    is_evidence[evidence] = True
    shares_by = {name: [] for name in ["evidence", "base", *groups]}
    for layer in cache.layers:
        if getattr(layer, "positions", None) is None:  # a layer the cache does not manage (hybrid models)
            continue
        last_round = layer.next_eviction[0] - layer.config.update_interval  # 0: no round has run
        decided = torch.zeros(length, dtype=torch.bool)
        decided[sinks:max(sinks, last_round - recent_window)] = True
        other = decided & ~is_evidence
        shares = held_shares(layer.positions[0], layer.token_valid[0], decided & is_evidence, other,
                             *(other & mask for mask in groups.values()))
        for name, share in zip(shares_by, shares):
            shares_by[name].append(share)
    return shares_by


def _share(value: torch.Tensor) -> float | None:
    """A share for the JSON: None where no token of its group was decided (NaN is not JSON)."""
    return None if torch.isnan(value) else float(value)


def _floats(shares: list[float | None]) -> list[float]:
    return [float("nan") if share is None else share for share in shares]


def _cell(share: float | None) -> str:
    return "–" if share is None else f"{share:.3f}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for row in result["rows"][1:]:  # the full cache holds everything
        line, = ax.plot(_floats(row["evidence_by_layer"]), "o-", ms=3, label=f"{row['label']}: evidence")
        if row["policy"] == "namm":
            ax.plot(_floats(row["base_by_layer"]), "--", color=line.get_color(), label=f"{row['label']}: other decided tokens")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of (token, KV head) pairs held after the prompt")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Evidence retention by layer ({result['prompts']} pass-key / needle prompts, {result['memory']})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorer", required=True, help="a scorer folder or name (its stored settings are used)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--baselines", default="streaming_llm,h2o,key_norm,random",
                        help="comma-separated policies, each run with the scorer's sinks and recent window")
    parser.add_argument("--budget", default=None,
                        help="a fraction budget for every cache (default: the scorer's cap, as a token budget)")
    parser.add_argument("--prompts-per-task", default="8")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(EVIDENCE_TASKS)} (default: {','.join(TASKS)})")
    parser.add_argument("--tokens", default="1200")
    parser.add_argument("--haystack", default="kjv_genesis", help="the haystack text (default: the training text)")
    parser.add_argument("--seed", default="evidence-retention")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--out", required=True, help="results JSON (the PNG is written beside it)")
    args = parser.parse_args(argv)
    from namm_cache import CacheSpec
    from namm_cache.evolution.evaluate import _number, check_baselines, protected_label
    from namm_cache.evolution.fitness import ExampleResult, mean_kept_fraction, normalized_task_scores, score_and_answer
    from namm_cache.evolution.run import load_model
    from namm_cache.hub import load_scorer
    from namm_cache.tasks import build_task
    from namm_cache.tasks.base import token_ids
    from namm_cache.validation import check_float, check_int

    try:  # every flag is checked before the model loads
        baselines = check_baselines("--baselines", args.baselines)
        prompts_per_task = check_int("--prompts-per-task", _number("--prompts-per-task", args.prompts_per_task), minimum=1)
        tokens = check_int("--tokens", _number("--tokens", args.tokens), minimum=1)
        threads = check_int("--threads", _number("--threads", args.threads), minimum=1)
        fraction = None if args.budget is None else check_float("--budget", _number("--budget", args.budget), above=0.0,
                                                                 maximum=1.0)
        out = output_file("--out", args.out)
        tasks = task_names("--tasks", args.tasks, EVIDENCE_TASKS)
        task_specs = [{"name": task, "tokens": tokens, "haystack": args.haystack} for task in tasks]
        for spec in task_specs:
            build_task(spec)
        loaded = load_scorer(args.scorer)
        config = loaded.config
        if fraction is None and config.max_tokens is None:
            raise ValueError(f"{args.scorer} has no cap (max_tokens): give --budget F so that every cache holds the same memory.")
    except (ValueError, OSError) as error:  # ScorerLoadError is a ValueError
        return refuse("evidence_retention", error)
    torch.set_num_threads(threads)
    try:
        model, tokenizer = load_model(args.model)
    except (ValueError, OSError) as error:
        return refuse("evidence_retention", error)
    chunk = config.update_interval
    protection = config.replace(max_tokens=None)  # the baselines' budget replaces the cap; sinks, window stay
    budget = fraction if fraction is not None else config.max_tokens
    memory = f"budget {fraction:.0%}" if fraction is not None else f"cap {config.max_tokens} tokens"
    rng = random.Random(args.seed)
    examples = [e for spec in task_specs for e in build_task(spec).sample(tokenizer, rng, prompts_per_task)]
    evidence = [torch.tensor(e.evidence_positions(tokenizer)) for e in examples]
    prompts = [token_ids(tokenizer, e.prompt) for e in examples]
    groups = [token_groups(tokenizer, prompt) for prompt in prompts]

    caches = {"full": ("full cache", lambda e, i: CacheSpec(policy="full", config=protection))}
    caches["namm"] = (f"NAMM ({memory})", lambda e, i: CacheSpec(
        scorer=loaded.scorer, config=config.replace(max_tokens=None) if fraction is not None else config, budget=fraction))
    protected = protected_label(config)
    for policy in baselines:
        caches[policy] = (f"{policy} + {protected}",
                          lambda e, i, policy=policy: CacheSpec(policy=policy, budget=budget, config=protection))
    caches["oracle"] = ("oracle (ceiling)", lambda e, i: CacheSpec(
        policy="oracle", budget=budget, config=protection.own_rule(keep_protection=True),  # the evidence first, as is
        policy_kwargs={"positions": evidence[i].tolist()}))

    rows, full_results = [], None
    for policy, (label, spec) in tqdm(caches.items(), desc="caches"):
        results, correct, layers = [], [], {}  # layers: {share name: per prompt, its per-layer shares}
        for i, example in enumerate(examples):
            answer = score_and_answer(model, tokenizer, spec(example, i).build(model), example, chunk)
            results.append(ExampleResult(answer.score, answer.kept_fraction))
            correct.append(answer.correct)
            if policy != "full":
                held = retention_after_prompt(model, spec(example, i).build(model), prompts[i], evidence[i], chunk,
                                              sinks=config.sinks, recent_window=config.recent_window, groups=groups[i])
                for name, shares in held.items():
                    layers.setdefault(name, []).append(shares)
        row = {"label": label, "policy": policy, "kept_fraction": mean_kept_fraction(results),
               "scores": [result.score for result in results], "correct": correct}
        if policy == "full":
            full_results = results
        else:
            by_layer, base = (torch.tensor(layers.pop(name)).nanmean(0) for name in ("evidence", "base"))
            row.update(evidence_by_layer=[_share(value) for value in by_layer], base_by_layer=[_share(value) for value in base],
                       evidence_retention=_share(by_layer.nanmean()), base_rate=_share(base.nanmean()),
                       held_by_group={name: _share(torch.tensor(values).nanmean()) for name, values in layers.items()})
        row["normalized"] = normalized_task_scores(results, full_results, examples)
        row["greedy"] = {task: sum(c for c, e in zip(correct, examples) if e.task == task) for task in tasks}
        rows.append(row)

    result = {**provenance(__file__, argv), "scorer": args.scorer, "model": args.model, "memory": memory,
              "tasks": list(tasks), "tokens": tokens, "haystack": args.haystack, "seed": args.seed,
              "prompts": len(examples), "prompts_per_task": prompts_per_task, "rows": rows}
    namm_kept, baseline_kept = rows[1]["kept_fraction"], [row["kept_fraction"] for row in rows[2:]]
    if baseline_kept and namm_kept < min(baseline_kept) - 0.02:
        print(f"note: NAMM held {namm_kept:.1%}, less than the baselines' {min(baseline_kept):.1%}: its threshold kept "
              "fewer tokens than its cap allows, so the baselines had more memory.", file=sys.stderr)
    print(f"| cache | kept | evidence held | other decided tokens held | lift | normalised {' / '.join(tasks)} | greedy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows[1:]:
        lift = row["evidence_retention"] / row["base_rate"] if row["evidence_retention"] is not None and row["base_rate"] else float("nan")
        normalized = " / ".join(f"{row['normalized'][t]:.3f}" for t in tasks)
        greedy = " / ".join(f"{row['greedy'][t]}/{prompts_per_task}" for t in tasks)
        print(f"| {row['label']} | {row['kept_fraction']:.0%} | {_cell(row['evidence_retention'])} | {_cell(row['base_rate'])} | "
              f"{lift:.2f}x | {normalized} | {greedy} |")
    names = list(rows[1]["held_by_group"])
    print(f"\nShare of the other decided tokens held, by kind and depth (evidence excluded):\n| cache | {' | '.join(names)} |")
    print("|---|" + "---:|" * len(names))
    for row in rows[1:]:
        print(f"| {row['label']} | " + " | ".join(_cell(row["held_by_group"][name]) for name in names) + " |")
    out.write_text(json.dumps(result, indent=2, allow_nan=False))
    plot(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
