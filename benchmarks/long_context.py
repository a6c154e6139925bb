"""Time and memory against prompt length: DynamicCache vs NAMM (25% and threshold) vs key_norm / h2o at 25%.

    python benchmarks/long_context.py                                         # SmolLM2-135M, CPU, 2k/4k/8k
    python benchmarks/long_context.py --model random:smollm2-135m --lengths 2048,4096,8192,16384
    python benchmarks/long_context.py --model random:llama-3.2-1b --device cuda --dtype bfloat16 --tag gpu

For every prompt length and cache (measured side by side in one run; on CUDA each after one untimed run at
the same shapes, since sdpa's first call at a new key length is several times slower there): prefill
tokens/s (`--chunk`-token chunks through the cache), decode ms/token at the end of the prompt (median over
`--new-tokens` greedy steps, so an eviction round that lands on one step does not decide it; the mean is
recorded too), peak KV bytes (keys + values held, all layers) and end-to-end seconds (prefill + decode).
Random-weight models (`random:SHAPE`) have the real architecture, so time and memory are real; their
answers mean nothing.

Writes `benchmarks/results/long_context[_TAG].json` and `long_context[_TAG].png`.
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

from namm_cache import CacheSpec, NAMMCache, install_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, load_benchmark_model, run_settings, synchronize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHES = ["dynamic_cache", "namm_25pct", "namm_threshold", "key_norm_25pct", "h2o_25pct"]


def cache_spec(name: str, scorer: str, interval: int) -> CacheSpec:
    """The cache a row name stands for (`dynamic_cache` is transformers' own, built apart)."""
    settings = {"update_interval": interval}
    if name == "namm_threshold":
        return CacheSpec(scorer=scorer, overrides=settings)
    policy = name.removesuffix("_25pct")
    return CacheSpec(policy=policy, scorer=scorer if policy == "namm" else None, budget=0.25, overrides=settings)


def make_cache(name: str, model, specs: dict[str, CacheSpec]):
    return DynamicCache(config=model.config) if name == "dynamic_cache" else specs[name].build(model)


def kv_bytes(cache) -> int:
    """Keys + values held now, all layers."""
    if isinstance(cache, NAMMCache):
        return cache.kv_bytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if getattr(layer, "keys", None) is not None)


@torch.no_grad()
def measure(model, ids: torch.Tensor, cache, chunk: int, new_tokens: int) -> dict:
    device = ids.device
    synchronize(device)
    start = time.perf_counter()
    peak = 0
    for part in ids.split(chunk, dim=1):
        logits = model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        peak = max(peak, kv_bytes(cache))
    synchronize(device)
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(new_tokens):
        step_start = time.perf_counter()
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        synchronize(device)
        steps.append(time.perf_counter() - step_start)
        peak = max(peak, kv_bytes(cache))
    if isinstance(cache, NAMMCache):
        peak = max(peak, cache.peak_kv_bytes)
        kept = cache.stats()["mean_kept_fraction"]
    else:
        kept = 1.0
    return {
        "prefill_seconds": prefill,
        "prefill_tokens_per_second": ids.shape[1] / prefill,
        "decode_ms_per_token": 1000 * statistics.median(steps),
        "decode_ms_per_token_mean": 1000 * statistics.mean(steps),
        "end_to_end_seconds": prefill + sum(steps),
        "peak_kv_bytes": peak,
        "kept_fraction": kept,
    }


def median_row(runs: list[dict]) -> dict:
    """Each timing's median over repeated runs, with the decode and end-to-end spread (min, max) when repeated."""
    row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    if len(runs) > 1:
        row["repeats"] = len(runs)
        for key in ("decode_ms_per_token", "end_to_end_seconds"):
            row[f"{key}_range"] = [min(run[key] for run in runs), max(run[key] for run in runs)]
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = result["lengths"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in result["caches"]:
        rows = [result["rows"][str(n)][name] for n in lengths]
        style = "o-" if name == "dynamic_cache" else "s--"
        axes[0].plot(lengths, [r["end_to_end_seconds"] for r in rows], style, label=name)
        axes[1].plot(lengths, [r["decode_ms_per_token"] for r in rows], style, label=name)
        axes[2].plot(lengths, [r["peak_kv_bytes"] / 2**20 for r in rows], style, label=name)
    for ax, title in zip(axes, ["end-to-end seconds", "decode ms / token", "peak KV (MiB)"]):
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['model']} ({result['dtype']}, {result['device']}), {result['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="offline model name or random:SHAPE")
    parser.add_argument("--scorer", default="namm-cache/smollm2-135m-bam")
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--caches", default=",".join(CACHES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                        help="the model's base attention (what DynamicCache and non-observing caches run)")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--update-interval", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each cache at each length, interleaved (cache order rotated each repeat); "
                             "each number is the median over them, the spread is recorded (use 3+ on a shared GPU machine)")
    parser.add_argument("--warm-runs", type=int, default=None,
                        help="untimed runs of each cache at each length before the timed one (default: 1 on CUDA, where "
                             "sdpa's first call at a new key length is several times slower, else 0)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    caches = args.caches.split(",")
    unknown = sorted(set(caches) - set(CACHES))
    if unknown:
        parser.error(f"unknown caches {unknown}; choose from {CACHES}")
    if min(lengths) < 1 or args.chunk < 1 or args.new_tokens < 1 or args.update_interval < 1:
        parser.error("lengths, --chunk, --new-tokens and --update-interval must be positive")
    if args.warm_runs is None:
        args.warm_runs = 1 if args.device.startswith("cuda") else 0
    if args.warm_runs < 0 or args.repeats < 1:
        parser.error("--warm-runs must be >= 0 and --repeats >= 1")
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, _ = load_benchmark_model(args.model, dtype=DTYPES[args.dtype], device=args.device,
                                    max_positions=max(32768, max(lengths) + args.new_tokens), attn_implementation=args.attn)
    window = getattr(model.config, "max_position_embeddings", None)
    if window is not None and max(lengths) + args.new_tokens > window:
        parser.error(f"{args.model} has a {window}-token window; use --model random:SHAPE for longer prompts")
    install_attention(model)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    ids_all = torch.randint(100, model.config.vocab_size - 100, (1, max(lengths)), generator=generator).to(device)
    measure(model, ids_all[:, : args.chunk], DynamicCache(config=model.config), args.chunk, 2)  # warm-up
    specs = {name: cache_spec(name, args.scorer, args.update_interval).load() for name in caches if name != "dynamic_cache"}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    path = args.out_dir / f"long_context{suffix}.json"
    rows: dict[str, dict] = {}
    for length in tqdm(lengths, desc="lengths"):
        ids = ids_all[:, :length]
        rows[str(length)] = {}
        for name in caches:
            for _ in range(args.warm_runs):  # untimed: kernels, plans and allocator warmed at exactly these shapes
                measure(model, ids, make_cache(name, model, specs), args.chunk, args.new_tokens)
        runs: dict[str, list[dict]] = {name: [] for name in caches}
        for repeat in range(args.repeats):  # interleaved, so a slow spell of the machine hits every cache alike
            for name in caches[repeat % len(caches):] + caches[: repeat % len(caches)]:
                cache = make_cache(name, model, specs)
                runs[name].append(measure(model, ids, cache, args.chunk, args.new_tokens))
                del cache
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for name in caches:
            rows[str(length)][name] = median_row(runs[name])
        base = rows[str(length)].get("dynamic_cache")
        if base is not None:
            for entry in rows[str(length)].values():
                entry["end_to_end_ratio"] = entry["end_to_end_seconds"] / base["end_to_end_seconds"]
                entry["decode_ratio"] = entry["decode_ms_per_token"] / base["decode_ms_per_token"]
                entry["peak_kv_ratio"] = entry["peak_kv_bytes"] / base["peak_kv_bytes"]
        # Written after every length, so a run cut short (a device lease's time limit) keeps what it measured.
        result = {
            **run_settings(__file__, argv, args, device, ("attn", "chunk", "update_interval", "new_tokens", "warm_runs", "repeats", "scorer")),
            "lengths": [n for n in lengths if str(n) in rows],
            "caches": caches,
            "rows": rows,
        }
        path.write_text(json.dumps(result, indent=2))
    plot(result, args.out_dir / f"long_context{suffix}.png")
    print(render_table(result))
    return path


def spread(row: dict, key: str, digits: int) -> str:
    """` (low-high)` over the repeats, or nothing for a single run."""
    low_high = row.get(f"{key}_range")
    return f" ({low_high[0]:.{digits}f}-{low_high[1]:.{digits}f})" if low_high else ""


def render_table(result: dict) -> str:
    lines = ["| tokens | cache | kept | prefill tok/s | decode ms/token | peak KV MiB | end-to-end s | vs DynamicCache (e2e / decode / KV) |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for length in result["lengths"]:
        for name, row in result["rows"][str(length)].items():
            ratios = (f"{row['end_to_end_ratio']:.2f}x / {row['decode_ratio']:.2f}x / {row['peak_kv_ratio']:.2f}x"
                      if "end_to_end_ratio" in row else "-")
            lines.append(f"| {length} | {name} | {row['kept_fraction']:.0%} | {row['prefill_tokens_per_second']:.0f} | "
                         f"{row['decode_ms_per_token']:.1f}{spread(row, 'decode_ms_per_token', 1)} | "
                         f"{row['peak_kv_bytes'] / 2**20:.1f} | "
                         f"{row['end_to_end_seconds']:.2f}{spread(row, 'end_to_end_seconds', 2)} | {ratios} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
