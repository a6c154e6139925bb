"""Overhead and peak memory of NAMMCache on the offline SmolLM2-135M-Instruct (CPU).

    make bench        # or: python benchmarks/overhead_memory.py [--quick]

1. Wall time, measured side by side in one run (runs alternate, median of --repeats): a 2k-token prompt
   prefilled in 512-token chunks plus 32 greedy tokens, with
     - DynamicCache (reference),
     - NAMMCache with the zero (keep-all) scorer,
     - NAMMCache with a keep-all scorer that still observes attention (the full feature pipeline runs),
     - NAMMCache with the hand-set attention-mass scorer and a 1k cap (real eviction).
2. Peak KV bytes of NAMMCache with a 1k-token cap and 512-token chunks as the prompt grows to 16k tokens,
   against the bound cap + chunk and the size a full cache would reach.

Writes `benchmarks/results/overhead_memory.json` and `benchmarks/results/peak_kv.png`.
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

from namm_cache import NAMMCache, NAMMConfig, attention_mass_scorer
from namm_cache.scorers import keep_all_observing_scorer
from namm_cache.offline import load_offline_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed_generate(model, ids, cache, chunk: int, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            prefill_chunk_size=chunk,
            pad_token_id=0,
        )
    return time.perf_counter() - start


def overhead(model, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    ids = torch.randint(100, model.config.vocab_size - 100, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    chunk = 512
    mass = attention_mass_scorer(bias=10.0)
    variants = {
        "dynamic_cache": lambda: DynamicCache(config=model.config),
        "namm_keep_all_zero_scorer": lambda: NAMMCache(model=model),
        "namm_keep_all_observing": lambda: NAMMCache(model=model, scorer=keep_all_observing_scorer()),
        "namm_attention_mass_cap1024": lambda: NAMMCache(model=model, scorer=mass, max_tokens=1024),
    }
    timed_generate(model, ids[:, :256], DynamicCache(config=model.config), chunk, 2)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in tqdm(range(repeats), desc="overhead rounds"):
        for name, make in variants.items():
            times[name].append(timed_generate(model, ids, make(), chunk, new_tokens))
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["dynamic_cache"]
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_chunk_size": chunk,
        "repeats": repeats,
        "seconds": times,
        "median_seconds": medians,
        "ratio_to_dynamic_cache": {name: value / base for name, value in medians.items()},
    }


def peak_memory(model, lengths: list[int], cap: int, chunk: int) -> dict:
    config = NAMMConfig(update_interval=chunk, max_tokens=cap)
    scorer = attention_mass_scorer(bias=10.0)
    text = model.config
    layers = text.num_hidden_layers
    kv_heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * layers * kv_heads * head_dim * 4  # fp32 keys + values, all layers
    rows = []
    for length in lengths:
        ids = torch.randint(100, text.vocab_size - 100, (1, length), generator=torch.Generator().manual_seed(length))
        cache = NAMMCache(model=model, scorer=scorer, config=config)
        with torch.no_grad():
            for part in tqdm(ids.split(chunk, dim=1), desc=f"prefill {length}", leave=False):
                model(input_ids=part, cache=cache, use_cache=True)
        rows.append(
            {
                "prompt_tokens": length,
                "peak_kv_bytes": cache.peak_kv_bytes,
                "bound_bytes": (cap + chunk) * per_token,
                "full_cache_kv_bytes": length * per_token,
                "peak_over_bound": cache.peak_kv_bytes / ((cap + chunk) * per_token),
            }
        )
    return {"cap": cap, "chunk": chunk, "bytes_per_token_full": per_token, "rows": rows}


def plot(memory: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = memory["rows"]
    lengths = [r["prompt_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [r["full_cache_kv_bytes"] / 2**20 for r in rows], "o-", label="full cache (DynamicCache size)")
    ax.plot(lengths, [r["peak_kv_bytes"] / 2**20 for r in rows], "s-", label=f"NAMMCache peak (cap {memory['cap']})")
    ax.axhline(rows[0]["bound_bytes"] / 2**20, color="gray", ls="--", label="cap + chunk bound")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("KV memory (MiB)")
    ax.set_title("SmolLM2-135M, fp32, 512-token chunks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, _ = load_offline_model()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.quick:
        speed = overhead(model, 512, 4, 1)
        memory = peak_memory(model, [1024, 2048], cap=256, chunk=128)
    else:
        speed = overhead(model, 2048, 32, args.repeats)
        memory = peak_memory(model, [2048, 4096, 8192, 16384], cap=1024, chunk=512)
    result = {
        **provenance(__file__),
        "overhead": speed,
        "peak_memory": memory,
    }
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"overhead_memory{suffix}.json").write_text(json.dumps(result, indent=2))
    plot(memory, RESULTS / f"peak_kv{suffix}.png")
    print(json.dumps({"ratio_to_dynamic_cache": speed["ratio_to_dynamic_cache"]}, indent=2))
    for row in memory["rows"]:
        print(
            f"{row['prompt_tokens']:>6} tokens: NAMM peak {row['peak_kv_bytes'] / 2**20:6.1f} MiB "
            f"(bound {row['bound_bytes'] / 2**20:.1f}), full cache {row['full_cache_kv_bytes'] / 2**20:6.1f} MiB"
        )


if __name__ == "__main__":
    main()
