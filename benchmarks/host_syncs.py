"""Host synchronisations per decode step: how often each cache makes Python wait for a tensor's value.

    python benchmarks/host_syncs.py --out benchmarks/results/host_syncs.json

On a GPU every such read (`bool(tensor)`, `.item()`, `.tolist()`, `int(tensor)`, `float(tensor)`) stalls
the host until the device has finished all queued work, so the next kernels cannot be queued ahead; with
small models a decode step is then bound by these stalls, not by compute. This counts them on any device
by wrapping those tensor methods while `generate` decodes, for a random-weight model of a real shape
(weights do not change the control flow). Counts are per decode step, averaged over the steps between
two eviction rounds and across one (rounds read sizes back by design, once per `update_interval` tokens).

It also counts operator calls per decode step (`torch.profiler`, the outermost `aten::` calls): all of them,
and those that are not views (`view`, `slice`, `transpose`, ...: these move no data), which is a CPU-side
proxy for kernel launches on a GPU, where a step of a small model is bound by launches.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_benchmark_model, provenance  # noqa: E402

READS = ("__bool__", "item", "tolist", "__int__", "__float__")
VIEW_OPS = {"aten::view", "aten::slice", "aten::transpose", "aten::unsqueeze", "aten::squeeze", "aten::expand",
            "aten::alias", "aten::reshape", "aten::select", "aten::as_strided", "aten::t", "aten::permute",
            "aten::detach", "aten::_unsafe_view", "aten::split", "aten::unbind", "aten::narrow", "aten::expand_as",
            "aten::view_as", "aten::flatten", "aten::unflatten", "aten::chunk", "aten::lift_fresh", "aten::contiguous"}


@contextmanager
def counting_reads(counter: Counter):
    """Count calls of the tensor methods that copy a value to the host, by method name."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            counter[name] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def greedy_decode(model, cache, prompt: torch.Tensor, new_tokens: int, chunk: int) -> None:
    """`generate` `new_tokens` greedy tokens after `prompt`, prefilled in `chunk`-token chunks, through `cache`."""
    model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, prefill_chunk_size=chunk, pad_token_id=0)


def reads_per_step(model, make_cache, prompt: torch.Tensor, steps: int, chunk: int) -> dict[str, float]:
    """Host reads per decode step: (reads of `steps` + 16 new tokens) - (reads of 16), over `steps`."""
    def count(new_tokens: int) -> Counter:
        counter = Counter()
        with counting_reads(counter):
            greedy_decode(model, make_cache(), prompt, new_tokens, chunk)
        return counter

    short, long = count(16), count(16 + steps)
    per_step = {name: (long[name] - short[name]) / steps for name in READS}
    per_step["total"] = sum(per_step.values())
    return per_step


def operators_per_step(model, make_cache, prompt: torch.Tensor, steps: int, chunk: int) -> dict[str, float]:
    """Outermost `aten::` calls per decode step, all and non-view, by the same difference of two runs."""
    from torch.profiler import ProfilerActivity, profile

    def count(new_tokens: int) -> tuple[int, int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            greedy_decode(model, make_cache(), prompt, new_tokens, chunk)
        names = [event.name for event in prof.events() if event.name.startswith("aten::")
                 and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))]
        return len(names), sum(name not in VIEW_OPS for name in names)

    (short_all, short_compute), (long_all, long_compute) = count(16), count(16 + steps)
    return {"all": (long_all - short_all) / steps, "non_view": (long_compute - short_compute) / steps}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:smollm2-135m")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=128, help="decode steps measured (a multiple of update_interval)")
    parser.add_argument("--update-interval", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from transformers import DynamicCache

    from namm_cache import NAMMCache, NAMMConfig
    from namm_cache.hub import DEFAULT_SCORER, load_scorer

    model, _ = load_benchmark_model(args.model)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompt = torch.randint(3, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    config = NAMMConfig(update_interval=args.update_interval)
    scorer = load_scorer(DEFAULT_SCORER).scorer
    caches = {
        "dynamic_cache": lambda: DynamicCache(config=model.config),
        "namm_25pct": lambda: NAMMCache(model=model, scorer=scorer, config=config, budget=0.25),
        "key_norm_25pct": lambda: NAMMCache(model=model, policy="key_norm", config=config, budget=0.25),
        "h2o_25pct": lambda: NAMMCache(model=model, policy="h2o", config=config, budget=0.25),
    }
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    rows = {name: reads_per_step(model, make, prompt, args.steps, args.update_interval) for name, make in caches.items()}
    operators = {name: operators_per_step(model, make, prompt, args.steps, args.update_interval) for name, make in caches.items()}
    for name, row in rows.items():
        print(f"{name:>16}: {row['total']:6.2f} host reads per decode step ({layers} layers): "
              + ", ".join(f"{key} {row[key]:.2f}" for key in READS if row[key])
              + f"; {operators[name]['all']:.0f} operator calls, {operators[name]['non_view']:.0f} not views")
    result = {**provenance(__file__, argv), "model": args.model, "layers": layers, "tokens": args.tokens, "steps": args.steps,
              "update_interval": args.update_interval, "reads_per_step": rows, "operators_per_step": operators}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
