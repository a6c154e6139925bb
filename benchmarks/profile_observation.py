"""Where the time of a NAMM cache goes: one 2k-token prefill + decode split into phases, side by side with
DynamicCache in one run.

    python benchmarks/profile_observation.py                       # SmolLM2-135M, CPU
    python benchmarks/profile_observation.py --model random:llama-3.2-1b --device cuda --dtype bfloat16

Phases (timed with `namm_cache.profiling`, which is a no-op outside profiling): the attention kernel
(eager with probabilities when the cache observes, the model's own kernel otherwise), mask building,
per-chunk bookkeeping, observation (GQA averaging + spectrogram folding), appending to storage, scoring
rounds (features + scorer), selection and compaction. "model outside attention" is the rest of the wall
time: projections, MLPs, norms and the model's own Python, which is the same work for every cache, so the
difference of that row to DynamicCache's is overhead that no phase names.

Writes `benchmarks/results/profile_observation[_TAG].json`; the README table is rendered from it.
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
from namm_cache.profiling import PHASES, profile_phases
from namm_cache.scorers import keep_all_observing_scorer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, load_benchmark_model, run_settings, synchronize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def cache_factories(model, scorer: str, interval: int) -> dict:
    """The caches profiled: the reference, NAMM observing but keeping all, NAMM at 25%, and NAMM on its threshold."""
    settings = {"update_interval": interval}
    specs = {
        "namm_keep_all_observing": CacheSpec(scorer=keep_all_observing_scorer(), overrides=settings),
        "namm_25pct": CacheSpec(scorer=scorer, budget=0.25, overrides=settings).load(),
        "namm_threshold": CacheSpec(scorer=scorer, overrides=settings).load(),
    }
    return {"dynamic_cache": lambda: DynamicCache(config=model.config),
            **{name: (lambda spec=spec: spec.build(model)) for name, spec in specs.items()}}


@torch.no_grad()
def run_once(model, ids: torch.Tensor, cache, chunk: int, new_tokens: int) -> dict:
    """Prefill `ids` in chunks, then greedy-decode `new_tokens`; wall seconds of each part and phase times."""
    device = ids.device
    with profile_phases() as phases:
        synchronize(device)
        start = time.perf_counter()
        for part in ids.split(chunk, dim=1):
            logits = model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        synchronize(device)
        prefill = time.perf_counter() - start
        prefill_phases = dict(phases.seconds)
        token = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        synchronize(device)
        decode = time.perf_counter() - start
    total_phases = dict(phases.seconds)
    decode_phases = {name: total_phases[name] - prefill_phases.get(name, 0.0) for name in total_phases}
    kept = cache.stats()["mean_kept_fraction"] if isinstance(cache, NAMMCache) else 1.0
    return {"prefill_seconds": prefill, "decode_seconds": decode, "prefill_phases": prefill_phases,
            "decode_phases": decode_phases, "kept_fraction": kept}


def summarise(runs: list[dict], part: str) -> dict:
    """Median wall seconds of `part` and the median seconds of each phase, plus the rest."""
    wall = statistics.median(r[f"{part}_seconds"] for r in runs)
    names = sorted({name for r in runs for name in r[f"{part}_phases"]})
    phases = {name: statistics.median(r[f"{part}_phases"].get(name, 0.0) for r in runs) for name in names}
    phases["model outside attention"] = max(wall - sum(phases.values()), 0.0)
    return {"seconds": wall, "phases": phases}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="offline model name or random:SHAPE")
    parser.add_argument("--scorer", default="namm-cache/smollm2-135m-bam")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--update-interval", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the result file")
    args = parser.parse_args(argv)
    for name in ("prompt_tokens", "chunk", "update_interval", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, _ = load_benchmark_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    install_attention(model)  # DynamicCache runs pass through the same wrapper, so its attention is timed too
    device = torch.device(args.device)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, args.prompt_tokens),
                        generator=torch.Generator().manual_seed(0)).to(device)
    factories = cache_factories(model, args.scorer, args.update_interval)
    run_once(model, ids[:, : args.chunk], DynamicCache(config=model.config), args.chunk, 2)  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name in factories}
    for _ in tqdm(range(args.repeats), desc="profile rounds"):
        for name, make in factories.items():  # alternate caches so that drift hits all alike
            runs[name].append(run_once(model, ids, make(), args.chunk, args.new_tokens))
    result = {
        **run_settings(__file__, argv, args, device, ("prompt_tokens", "chunk", "update_interval", "new_tokens", "repeats", "scorer")),
        "phase_descriptions": PHASES,
        "caches": {
            name: {
                "prefill": summarise(cache_runs, "prefill"),
                "decode": summarise(cache_runs, "decode"),
                "kept_fraction": statistics.mean(r["kept_fraction"] for r in cache_runs),
            }
            for name, cache_runs in runs.items()
        },
    }
    base = result["caches"]["dynamic_cache"]
    for entry in result["caches"].values():
        total = entry["prefill"]["seconds"] + entry["decode"]["seconds"]
        entry["total_seconds"] = total
        entry["ratio_to_dynamic_cache"] = total / (base["prefill"]["seconds"] + base["decode"]["seconds"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    path = args.out_dir / f"profile_observation{suffix}.json"
    path.write_text(json.dumps(result, indent=2))
    print(render_table(result))
    return path


def render_table(result: dict) -> str:
    """Markdown: one row per phase, prefill and decode seconds per cache."""
    caches = result["caches"]
    names = list(caches)
    phases = sorted({p for c in caches.values() for part in ("prefill", "decode") for p in c[part]["phases"]},
                    key=lambda p: (p == "model outside attention", p))
    header = "| phase | " + " | ".join(f"{n} prefill | {n} decode" for n in names) + " |"
    lines = [header, "|---|" + "---:|" * (2 * len(names))]
    for phase_name in phases:
        cells = []
        for n in names:
            for part in ("prefill", "decode"):
                cells.append(f"{caches[n][part]['phases'].get(phase_name, 0.0):.3f}")
        lines.append(f"| {phase_name} | " + " | ".join(cells) + " |")
    lines.append("| **wall** | " + " | ".join(f"**{caches[n][part]['seconds']:.3f}**" for n in names for part in ("prefill", "decode")) + " |")
    lines.append("| kept | " + " | ".join(f"{caches[n]['kept_fraction']:.0%} | " for n in names).rstrip(" |") + " |")
    lines.append("| total / DynamicCache | " + " | ".join(f"{caches[n]['ratio_to_dynamic_cache']:.2f}x | " for n in names).rstrip(" |") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
