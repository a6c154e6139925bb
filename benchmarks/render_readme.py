"""Render benchmark JSON results into README.md between `<!-- bench:NAME -->` markers (no hand-typed numbers).

    python benchmarks/render_readme.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def render_overhead_memory(result: dict) -> str:
    speed, memory = result["overhead"], result["peak_memory"]
    labels = {
        "dynamic_cache": "DynamicCache (reference)",
        "namm_keep_all_zero_scorer": "NAMMCache, zero scorer (keep-all; observation skipped)",
        "namm_keep_all_observing": "NAMMCache, keep-all scorer that observes (full feature pipeline)",
        "namm_attention_mass_cap1024": "NAMMCache, attention-mass scorer, cap 1024 (evicting)",
    }
    lines = [
        f"Measured {result['date']} on {result['machine']}; command: `{result['command']}`.",
        "",
        f"**Wall time**, SmolLM2-135M-Instruct fp32, {speed['prompt_tokens']}-token prompt in "
        f"{speed['prefill_chunk_size']}-token chunks + {speed['new_tokens']} greedy tokens, median of "
        f"{speed['repeats']} alternating runs:",
        "",
        "| cache | seconds | ratio to DynamicCache |",
        "|---|---:|---:|",
    ]
    for name, seconds in speed["median_seconds"].items():
        lines.append(f"| {labels.get(name, name)} | {seconds:.2f} | {speed['ratio_to_dynamic_cache'][name]:.2f}x |")
    lines += [
        "",
        f"**Peak KV memory**, cap {memory['cap']} tokens per layer/head, {memory['chunk']}-token chunks "
        "(bound: cap + chunk):",
        "",
        "| prompt tokens | NAMMCache peak (MiB) | bound (MiB) | full cache (MiB) |",
        "|---:|---:|---:|---:|",
    ]
    for row in memory["rows"]:
        lines.append(
            f"| {row['prompt_tokens']} | {row['peak_kv_bytes'] / 2**20:.1f} | {row['bound_bytes'] / 2**20:.1f} | "
            f"{row['full_cache_kv_bytes'] / 2**20:.1f} |"
        )
    lines += ["", "![peak KV memory](benchmarks/results/peak_kv.png)"]
    return "\n".join(lines)


RENDERERS = {"overhead_memory": render_overhead_memory}


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, render in RENDERERS.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        block = render(json.loads(path.read_text()))
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.S)
        text, count = pattern.subn(lambda m: m.group(1) + block + m.group(2), text)
        if count != 1:
            raise SystemExit(f"README.md has no <!-- bench:{name} --> block")
    readme.write_text(text)


if __name__ == "__main__":
    main()
