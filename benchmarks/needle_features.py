"""Which scorer inputs single out a needle before the question arrives? AUC of each input, needle vs haystack.

    python benchmarks/needle_features.py --out benchmarks/results/needle_features.json
    python benchmarks/needle_features.py --model gemma3-270m --scorer namm-cache/smollm2-135m-linear --out benchmarks/results/needle_features_gemma3.json

For pass-key and needle prompts (training text, a generator apart from training and validation draws),
one keep-all observing pass records what a scorer reads at every eviction round (`evolution/replay.py`).
At each round and in each (layer, KV head), the AUC is the probability that a needle token (a token of
the evidence sentence, `Example.evidence_positions`) scores above a haystack token on one input; both
are drawn from the middle of the held tokens (not the first 4, not the 128 newest, which protected tokens
cover). 0.5 is chance; above 0.5 the input ranks needles higher, below 0.5 lower.
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


def auc(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """`(R,)` per-row P(positive > negative) + P(tie) / 2, from `(R, P)` and `(R, N)` scores."""
    greater = (positive.unsqueeze(-1) > negative.unsqueeze(-2)).float().mean((-1, -2))
    ties = (positive.unsqueeze(-1) == negative.unsqueeze(-2)).float().mean((-1, -2))
    return greater + ties / 2


def pooled_low_key_norm(log_norms: torch.Tensor, valid: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Low key norm shared across rows: each row's log key norm z-scored over its `valid` tokens and negated,
    then averaged over the KV heads of each layer, and over every row. `log_norms` `(L*H, S, 2)` with rows
    layer-major (`evolution/replay.py`), `valid` `(L*H, S)`. Returns two `(L*H, S)` tensors, each row holding
    its layer's mean and the all-rows mean: a token's score, the same in every head (and layer) that reads it."""
    from namm_cache.features import standardize_rows

    rows = log_norms.shape[0]
    if rows % heads:
        raise ValueError(f"{rows} rows are not whole layers of {heads} KV heads.")
    low = -standardize_rows(log_norms[..., :1], valid)[..., 0]
    per_layer = low.view(rows // heads, heads, -1).mean(1, keepdim=True).expand(-1, heads, -1).reshape(rows, -1)
    return per_layer, low.mean(0, keepdim=True).expand(rows, -1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="evolution/configs/smollm2-replay.yaml", help="model, tasks and eviction settings (stage 0)")
    parser.add_argument("--model", default=None, help="replace the config's model (e.g. gemma3-270m: its KV rows are "
                        "the layers the cache manages, the 3 full-attention ones)")
    parser.add_argument("--scorer", default="runs/distill-smollm2", help="a scorer folder: its normalisation, and its scores as one more input")
    parser.add_argument("--prompts-per-task", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", default="needle-features")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from namm_cache import NAMMCache
    from namm_cache.evolution.config import EvolutionConfig
    from namm_cache.evolution.replay import record_prompt, replay_pooled
    from namm_cache.evolution.run import EvolutionRun
    from namm_cache.tasks import build_task
    from namm_cache.tasks.base import token_ids

    torch.set_num_threads(args.threads)
    overrides = ["validation_baselines=[]", f"threads={args.threads}"] + ([f"model={args.model}"] if args.model else [])
    config = EvolutionConfig.load(args.config, overrides)
    run = EvolutionRun(config, "/nonexistent-unused", progress=False)
    scorer = NAMMCache.from_pretrained(args.scorer, model=run.model).scorer
    namm = config.namm_config(0).replace(sinks=0, recent_window=0)
    rng = random.Random(args.seed)
    examples = [e for spec in config.all_tasks(0) for e in build_task(spec).sample(run.tokenizer, rng, args.prompts_per_task)]
    heads = run.model.config.get_text_config(decoder=True).num_key_value_heads  # rows are (layer, KV head), layer-major
    bin0 = namm.recency_dim  # the first spectrogram bin: the attention a token received (EMA)
    per_input: dict[tuple[str, str], list[torch.Tensor]] = {}
    for example in tqdm(examples, desc="prompts"):
        prompt, answer = token_ids(run.tokenizer, example.prompt), token_ids(run.tokenizer, example.answer)
        evidence = torch.tensor(example.evidence_positions(run.tokenizer))
        recording = record_prompt(run.model, prompt, answer, namm, config.chunk(0))
        full_attention_only = len(recording.cache.namm_layers) == len(recording.cache.layers)
        recording.prepare(scorer, namm)
        for round_ in recording.rounds:
            is_needle = torch.zeros(round_.arrived.shape[0], dtype=torch.bool)
            is_needle[evidence[evidence < is_needle.shape[0]]] = True
            middle = round_.arrived.clone()
            middle[:4] = False
            middle[max(0, round_.now - 127):] = False
            needle, haystack = middle & is_needle, middle & ~is_needle
            if not needle.any():
                continue
            rows = round_.features.shape[0]
            with torch.no_grad():
                features = round_.features
                if scorer.extra_inputs:
                    from namm_cache.features import with_extra_inputs
                    features = with_extra_inputs(scorer.extra_inputs, features, round_.log_norms, round_.arrived.expand(rows, -1),
                                                 round_.pooled)
                learned = scorer(features, round_.positions.expand(rows, -1), round_.arrived.expand(rows, -1))
            per_layer, all_layers = pooled_low_key_norm(round_.log_norms, round_.arrived.expand(rows, -1), heads)
            inputs = {
                "low key norm": -round_.log_norms[..., 0],
                "low key norm, mean of the layer's heads": per_layer,
                "low key norm, mean of all layers' heads": all_layers,
                "low value norm": -round_.log_norms[..., 1],
                "attention received (bin 0)": round_.features[..., bin0],
                "spectrogram, all bins": round_.features[..., bin0:].sum(-1),
                "recency (age)": -round_.age.float(),
                f"scorer {args.scorer}": learned,
            }
            if full_attention_only:  # what the linear_pooled scorer reads in layer l: the heads of layers 0..l
                inputs["low key norm, mean of the heads of layers 0..l"] = -replay_pooled(round_.log_norms[..., 0], round_.arrived, heads)
            for name, values in inputs.items():
                per_input.setdefault((example.task, name), []).append(auc(values[:, needle], values[:, haystack]))
    rows = []
    for (task, name), values in sorted(per_input.items()):
        table = torch.stack(values)  # (rounds, L*H)
        by_head = table.mean(0)
        rows.append({"task": task, "input": name, "mean_auc": float(table.mean()), "best_head_auc": float(by_head.max()),
                     "heads_above_0.8": int((by_head > 0.8).sum()), "heads": by_head.numel(), "rounds": table.shape[0]})
        print(f"{task:>8} | {name:>34} | mean AUC {rows[-1]['mean_auc']:.3f} | best head {rows[-1]['best_head_auc']:.3f} | "
              f"heads > 0.8: {rows[-1]['heads_above_0.8']}/{by_head.numel()}", flush=True)
    result = {**provenance(__file__, argv), "config": args.config, "model": config.model, "scorer": args.scorer, "prompts": len(examples), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
