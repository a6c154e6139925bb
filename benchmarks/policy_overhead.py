"""Per-step overhead of each eviction policy on the offline SmolLM2-135M-Instruct (CPU), at 2k tokens.

    python benchmarks/policy_overhead.py [--quick]

Two numbers per policy, both as ratios measured in this one run:
  - scoring: one eviction round over all 30 layers (observation -> score -> select, no compaction) on a
    2k-token cache, divided by the time of one decode-step forward of the model at 2k tokens;
  - end to end: a 2k-token prompt prefilled in 512-token chunks plus 16 greedy tokens at a 50% budget,
    divided by the same run with DynamicCache (observation costs included).

Writes `benchmarks/results/policy_overhead.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from namm_cache import CacheSpec, NAMMCache, attention_mass_scorer
from namm_cache.policies import BASELINE_POLICIES
from namm_cache.offline import load_offline_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, provenance  # noqa: E402
from namm_cache.selection import select_tokens

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ["namm", *BASELINE_POLICIES]


def make_cache(model, policy: str, budget, interval: int) -> NAMMCache:
    scorer = attention_mass_scorer(bias=10.0) if policy == "namm" else None
    return CacheSpec(policy=policy, scorer=scorer, budget=budget, overrides={"update_interval": interval}).build(model)


@torch.no_grad()
def scoring_round_seconds(model, ids, policy: str, repeats: int) -> float:
    """Time of scoring + selection in every NAMM layer, on a cache that holds the whole prompt."""
    # A 50% budget, and an interval past the prompt so that nothing is evicted while the cache fills.
    cache = make_cache(model, policy, 0.5, interval=ids.shape[1] * 2)
    for chunk in ids.split(512, dim=1):
        model(input_ids=chunk, cache=cache)

    def one_round():
        for layer in cache.namm_layers:
            observation = layer.observation(list(range(layer.batch_size)), now=layer.tokens_seen - 1)
            scores = layer.policy.score(observation)
            select_tokens(scores, observation.valid, observation.positions, threshold=None, max_tokens=observation.budget)

    one_round()
    return median_seconds(one_round, repeats)


@torch.no_grad()
def decode_step_seconds(model, ids, repeats: int) -> float:
    cache = DynamicCache(config=model.config)
    for chunk in ids.split(512, dim=1):
        model(input_ids=chunk, cache=cache)
    token = ids[:, -1:]

    def step():
        model(input_ids=token, cache=cache)
        for layer in cache.layers:  # keep the context at the same length
            layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]

    step()
    return median_seconds(step, repeats)


def generate_seconds(model, ids, cache, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, prefill_chunk_size=512, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, _ = load_offline_model()
    tokens = 512 if args.quick else 2048
    repeats = 1 if args.quick else 3
    new_tokens = 4 if args.quick else 16
    ids = torch.randint(100, model.config.vocab_size - 100, (1, tokens), generator=torch.Generator().manual_seed(0))
    decode = decode_step_seconds(model, ids, repeats)
    rows = {}
    reference = []
    for policy in tqdm(POLICIES, desc="policies"):
        scoring = scoring_round_seconds(model, ids, policy, repeats)
        ends, refs = [], []
        for _ in range(repeats):  # alternate with the reference so both see the same machine state
            refs.append(generate_seconds(model, ids, DynamicCache(config=model.config), new_tokens))
            ends.append(generate_seconds(model, ids, make_cache(model, policy, 0.5, 512), new_tokens))
        reference.extend(refs)
        rows[policy] = {
            "scoring_round_seconds": scoring,
            "scoring_over_decode_step": scoring / decode,
            "end_to_end_seconds": statistics.median(ends),
            "end_to_end_over_dynamic_cache": statistics.median(ends) / statistics.median(refs),
        }
    result = {
        **provenance(__file__),
        "prompt_tokens": tokens,
        "decode_step_seconds": decode,
        "dynamic_cache_generate_seconds": statistics.median(reference),
        "policies": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"policy_overhead{'_quick' if args.quick else ''}.json").write_text(json.dumps(result, indent=2))
    print(f"decode step at {tokens} tokens: {decode * 1000:.1f} ms")
    for policy, row in rows.items():
        print(f"{policy:>14}: scoring {row['scoring_over_decode_step']:.2f}x a decode step, "
              f"end to end {row['end_to_end_over_dynamic_cache']:.2f}x DynamicCache")


if __name__ == "__main__":
    main()
