"""Where does a scorer keep the needle? Evidence retention per layer, beside baselines given the same protection.

    python benchmarks/evidence_retention.py --scorer runs/smollm2-linear/scorer --out benchmarks/results/evidence_retention.json

Pass-key and needle prompts of the training text (`kjv_genesis`, a generator no training, validation or
held-out draw uses) go through the scorer at its stored settings and through each baseline run with the
scorer's own protected tokens (its sinks and recent window) inside the same memory: the scorer's cap as a
token budget, or `--budget F` for every cache. After the prompt, each layer reports

- **evidence retention**: the share of (evidence token, KV head) pairs still held (the needle sentence's
  tokens, `Example.evidence_positions`), and
- **base rate**: the same share for the other tokens the cache had to decide on (not the first `sinks`, not
  the `recent_window` newest).

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
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402

TASKS = ("passkey", "needle")


@torch.no_grad()
def retention_after_prompt(model, cache, prompt_ids: torch.Tensor, evidence: torch.Tensor, chunk: int, *, sinks: int,
                           recent_window: int) -> tuple[list[float], list[float]]:
    """Feed `prompt_ids` `(1, T)` through `cache` in `chunk`-token pieces; per layer, the share of (evidence token,
    KV head) pairs held and the share of the other decided tokens' pairs held (the base rate).

    Decided tokens are the prompt's tokens from position `sinks` up to `T - recent_window` (exclusive): the ones
    no protection keeps. Evidence positions outside that range are left out of both shares."""
    for part in prompt_ids.split(chunk, dim=1):
        model(input_ids=part.to(model.device), cache=cache, use_cache=True)
    length = prompt_ids.shape[1]
    decided = torch.zeros(length, dtype=torch.bool)
    decided[sinks:max(sinks, length - recent_window)] = True
    is_evidence = torch.zeros(length, dtype=torch.bool)
    is_evidence[evidence] = True
    needle, haystack = decided & is_evidence, decided & ~is_evidence
    evidence_kept, base_kept = [], []
    for layer in cache.layers:
        if getattr(layer, "positions", None) is None:  # a layer the cache does not manage (hybrid models)
            continue
        held = torch.zeros(layer.positions.shape[1], length, dtype=torch.bool)  # (heads, tokens)
        for head in range(held.shape[0]):
            positions = layer.positions[0, head][layer.token_valid[0, head]].cpu()
            held[head, positions[positions < length]] = True
        evidence_kept.append(float(held[:, needle].float().mean()) if needle.any() else float("nan"))
        base_kept.append(float(held[:, haystack].float().mean()) if haystack.any() else float("nan"))
    return evidence_kept, base_kept


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for row in result["rows"][1:]:  # the full cache holds everything
        line, = ax.plot(row["evidence_by_layer"], "o-", ms=3, label=f"{row['label']}: evidence")
        if row["policy"] == "namm":
            ax.plot(row["base_by_layer"], "--", color=line.get_color(), label=f"{row['label']}: other decided tokens")
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
    parser.add_argument("--budget", type=float, default=None,
                        help="a fraction budget for every cache (default: the scorer's cap, as a token budget)")
    parser.add_argument("--prompts-per-task", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1200)
    parser.add_argument("--haystack", default="kjv_genesis")
    parser.add_argument("--seed", default="evidence-retention")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from namm_cache import CacheSpec
    from namm_cache.evolution.evaluate import check_baselines
    from namm_cache.evolution.fitness import score_and_answer
    from namm_cache.evolution.run import load_model
    from namm_cache.hub import load_scorer
    from namm_cache.tasks import build_task
    from namm_cache.tasks.base import token_ids

    baselines = check_baselines("--baselines", args.baselines)
    loaded = load_scorer(args.scorer)
    config = loaded.config
    if args.budget is None and config.max_tokens is None:
        raise SystemExit(f"{args.scorer} has no cap (max_tokens): give --budget F so that every cache holds the same memory.")
    if args.budget is not None and not 0 < args.budget <= 1:
        raise SystemExit(f"--budget must be a fraction in (0, 1], got {args.budget}.")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    chunk = config.update_interval
    protection = config.replace(max_tokens=None)  # the baselines' budget replaces the cap; sinks, window stay
    budget = args.budget if args.budget is not None else config.max_tokens
    memory = f"budget {args.budget:.0%}" if args.budget is not None else f"cap {config.max_tokens} tokens"
    rng = random.Random(args.seed)
    examples = [e for task in TASKS for e in build_task(
        {"name": task, "tokens": args.tokens, "haystack": args.haystack}).sample(tokenizer, rng, args.prompts_per_task)]
    evidence = [torch.tensor(e.evidence_positions(tokenizer)) for e in examples]
    prompts = [token_ids(tokenizer, e.prompt) for e in examples]

    caches = {"full": ("full cache", lambda e, i: CacheSpec(policy="full", config=protection))}
    caches["namm"] = (f"NAMM ({memory})", lambda e, i: CacheSpec(
        scorer=loaded.scorer, config=config.replace(max_tokens=None) if args.budget is not None else config,
        budget=args.budget))
    for policy in baselines:
        caches[policy] = (f"{policy} + protection", lambda e, i, policy=policy: CacheSpec(policy=policy, budget=budget, config=protection))
    caches["oracle"] = ("oracle (ceiling)", lambda e, i: CacheSpec(
        policy="oracle", budget=budget, config=protection, policy_kwargs={"positions": evidence[i].tolist()}))

    rows, full_scores = [], None
    for policy, (label, spec) in tqdm(caches.items(), desc="caches"):
        scores, correct, kept, evidence_layers, base_layers = [], [], [], [], []
        for i, example in enumerate(examples):
            answer = score_and_answer(model, tokenizer, spec(example, i).build(model), example, chunk)
            scores.append(answer.score)
            correct.append(answer.correct)
            kept.append(answer.kept_fraction)
            if policy != "full":
                held = retention_after_prompt(model, spec(example, i).build(model), prompts[i], evidence[i], chunk,
                                              sinks=config.sinks, recent_window=config.recent_window)
                evidence_layers.append(held[0])
                base_layers.append(held[1])
        row = {"label": label, "policy": policy, "kept_fraction": sum(kept) / len(kept), "scores": scores,
               "correct": correct}
        if policy == "full":
            full_scores = scores
        else:
            by_layer = torch.tensor(evidence_layers).nanmean(0)
            base = torch.tensor(base_layers).nanmean(0)
            row.update(evidence_by_layer=by_layer.tolist(), base_by_layer=base.tolist(),
                       evidence_retention=float(by_layer.nanmean()), base_rate=float(base.nanmean()))
        row["normalized"] = {task: sum(s / f for s, f, e in zip(scores, full_scores, examples) if e.task == task)
                                   / sum(e.task == task for e in examples) for task in TASKS}
        row["greedy"] = {task: sum(c for c, e in zip(correct, examples) if e.task == task) for task in TASKS}
        rows.append(row)

    result = {**provenance(__file__, argv), "scorer": args.scorer, "model": args.model, "memory": memory,
              "tasks": list(TASKS), "tokens": args.tokens, "haystack": args.haystack, "seed": args.seed,
              "prompts": len(examples), "prompts_per_task": args.prompts_per_task, "rows": rows}
    print(f"| cache | kept | evidence held | other decided tokens held | lift | normalised {' / '.join(TASKS)} | greedy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows[1:]:
        lift = row["evidence_retention"] / row["base_rate"] if row["base_rate"] > 0 else float("inf")
        normalized = " / ".join(f"{row['normalized'][t]:.3f}" for t in TASKS)
        greedy = " / ".join(f"{row['greedy'][t]}/{args.prompts_per_task}" for t in TASKS)
        print(f"| {row['label']} | {row['kept_fraction']:.0%} | {row['evidence_retention']:.3f} | {row['base_rate']:.3f} | "
              f"{lift:.2f}x | {normalized} | {greedy} |")
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
