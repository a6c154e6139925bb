"""Render benchmark JSON results into README.md between `<!-- bench:NAME -->` markers (no hand-typed numbers).

    python benchmarks/render_readme.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
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


def render_policy_overhead(result: dict) -> str:
    lines = [
        f"Measured {result['date']} on {result['machine']}; command: `{result['command']}`. One decode step of the model "
        f"at {result['prompt_tokens']} tokens takes {result['decode_step_seconds'] * 1000:.1f} ms.",
        "",
        "| policy | one scoring round, all layers / decode step | 2k prefill + 16 tokens at 50% budget / DynamicCache |",
        "|---|---:|---:|",
    ]
    for policy, row in result["policies"].items():
        lines.append(f"| {policy} | {row['scoring_over_decode_step']:.2f}x | {row['end_to_end_over_dynamic_cache']:.2f}x |")
    lines += ["", "A scoring round runs once per `update_interval` tokens, so its cost per generated token is the ratio divided by the interval."]
    return "\n".join(lines)


def render_compare(result: dict) -> str:
    cells = result["cells"]
    tasks = list(next(iter(cells.values()))["per_task"])
    lines = [
        f"Measured {result.get('date', '')} on {result.get('machine', '')}; last command: `{result.get('command', '')}` "
        "(cells finished by earlier invocations with the same settings are kept); "
        f"{result['tokens']}-token held-out prompts, {result['settings']['prompts_per_task']} per task; NAMM scorer: "
        f"`{result.get('scorer', '')}`. Accuracy for retrieval tasks, long-text answer probability normalised by the "
        "full cache.",
        "",
        "| cache | budget | kept | score | " + " | ".join(tasks) + " | seconds |",
        "|---|---|---:|---:|" + "---:|" * len(tasks) + "---:|",
    ]
    for name, cell in cells.items():
        values = " | ".join(f"{cell['per_task'][t]:.2f}" if t in cell["per_task"] else "-" for t in tasks)
        budget = "-" if cell["budget"] is None else str(cell["budget"])
        policy = "oracle (ceiling; needle tasks)" if cell["policy"] == "oracle" else cell["policy"]
        lines.append(f"| {policy} | {budget} | {cell['kept_fraction']:.0%} | {cell.get('score', float('nan')):.2f} | {values} | {cell['seconds']:.0f} |")
    return "\n".join(lines)


def render_compare_smollm2(result: dict) -> str:
    return render_compare(result) + "\n\n![score vs retained KV](benchmarks/results/compare_smollm2_quality.png)"


def render_compare_gemma3(result: dict) -> str:
    return render_compare(result) + "\n\n![score vs retained KV](benchmarks/results/compare_gemma3_quality.png)"


def baseline_flags(result: dict) -> str:
    """The evaluate flags that chose the result's baseline rows (read from the rows, so older files render too)."""
    from namm_cache.evolution.evaluate import ACCEPTED_BASELINES, BASELINES

    policies = [row.get("policy") for row in result["rows"]]
    if None in policies:  # written before rows named their policy: every baseline, as then
        return ""
    plain = [policy for policy in policies if policy in ACCEPTED_BASELINES]
    protected = [policy.removesuffix("+protected") for policy in policies if policy.endswith("+protected")]
    flags = "" if plain == BASELINES else f" --baselines {','.join(plain) or repr('')}"
    flags += f" --protected-baselines {','.join(protected)}" if protected else ""
    return flags + (" --no-oracle" if "depths" in result and "oracle" not in policies else "")


def render_heldout(name: str):
    """Renderer for a held-out evaluation written to `benchmarks/results/<name>.json`."""

    def render(result: dict) -> str:
        from namm_cache.evolution.evaluate import table

        return (
            f"Measured {result['date']}; command: `python -m namm_cache.evolution.evaluate --scorer {result['scorer']} "
            + (f"--model {result['model']} " if result.get("model", "smollm2-135m-instruct") != "smollm2-135m-instruct" else "")
            + f"--prompts-per-task {result['prompts_per_task']}{' --no-cap' if result.get('no_cap') else ''}"
            + (f" --budget {result['budget']}" if result.get("budget") is not None else "")
            + (f" --recent-window {result['recent_window']}" if result.get("recent_window") is not None else "")
            + (f" --min-fraction {result['min_fraction']}" if result.get("min_fraction") is not None else "")
            + (f" --tokens {result['tokens']}" if result.get("tokens", 1000) != 1000 else "")
            + baseline_flags(result)
            + f" --out benchmarks/results/{name}.json`. Held-out KJV Proverbs haystacks of {result.get('tokens', 1000):,} tokens, seed {result['seed']}, "
            f"{result['prompts_per_task']} prompts per task. Cells: teacher-forced answer probability (greedy accuracy in "
            "parentheses); normalised mean = mean over tasks of score / full-cache score; each baseline at the budget "
            "under which it holds what the scorer held.\n\n" + table(result)
        )

    return render


def render_ruler_smollm2(result: dict) -> str:
    cells = result["cells"]
    settings = result["settings"]
    tasks = settings["tasks"]
    lines = [
        f"Measured {result.get('date', '')} on {result.get('machine', '')}; last command: `{result.get('command', '')}` "
        f"(cells finished by earlier invocations with the same settings are kept; NAMM scorer: `{result.get('scorer', '')}`). "
        f"RULER's generators at {settings['length']} tokens, {settings['samples']} samples per task, string_match_all; "
        "kept = mean fraction of real tokens held at the end of each request.",
        "",
        "| cache | budget | kept | mean | " + " | ".join(t.removeprefix("namm_ruler_") for t in tasks) + " | seconds |",
        "|---|---|---:|---:|" + "---:|" * len(tasks) + "---:|",
    ]
    for cell in sorted(cells.values(), key=lambda c: (c["policy"] != "full", c["policy"] != "namm", str(c["budget"]), -c["mean"])):
        values = " | ".join(f"{cell['scores'][t]:.2f}" for t in tasks)
        budget = "-" if cell["budget"] is None else str(cell["budget"])
        lines.append(f"| {cell['policy']} | {budget} | {cell['kept']:.0%} | {cell['mean']:.2f} | {values} | {cell['seconds']:.0f} |")
    return "\n".join(lines)


def render_benchmark(name: str, module: str, describe, plot: bool = False) -> callable:
    """Renderer for a benchmark script's result `<name>.json`: a provenance line, `describe(result)`, then the
    table the script itself renders (`module.render_table`)."""

    def render(result: dict) -> str:
        table = __import__(module).render_table(result)
        return (f"Measured {result['date']} on {result['machine']}, device {result['device']}, {result['dtype']}; "
                f"command: `{result['command']}`. {describe(result)}\n\n{table}"
                + (f"\n\n![time and memory vs length](benchmarks/results/{name}.png)" if plot else ""))

    return render


def describe_profile(result: dict) -> str:
    return (f"{result['model']}, {result['prompt_tokens']}-token prompt in {result['chunk']}-token chunks + "
            f"{result['new_tokens']} greedy tokens, `update_interval` {result['update_interval']}, scorer "
            f"`{result['scorer']}`; seconds per phase, median of {result['repeats']} alternating runs.")


def describe_long_context(name: str):
    def describe(result: dict) -> str:  # noqa: ARG001 - one describer per result file
        return (f"{result['model']}, {result['chunk']}-token prefill chunks, `update_interval` {result['update_interval']}, "
                f"{result['new_tokens']} greedy tokens (decode = median step), scorer `{result['scorer']}`.")

    return describe


# Held-out evaluations, each written to benchmarks/results/<name>.json and rendered into its README block.
HELDOUT_BLOCKS = (
    "heldout_smollm2",
    "heldout_smollm2_stage4",
    "heldout_linear",
    "heldout_linear_25",
    "heldout_linear_25_w64",
    "heldout_linear_23_w64",
    "heldout_linear_threshold_w64",
    "heldout_linear_protected",
    "heldout_threshold15_threshold",
    "heldout_pooled_start_threshold",
    "heldout_threshold15_2000",
    "heldout_threshold15_2000_floor40",
    "heldout_lengths14_threshold",
    "heldout_lengths14_2000",
    "heldout_all_layers_start_threshold",
    "heldout_all_layers_start_2000",
    "heldout_rule_neighbours_threshold",
    "heldout_rule_neighbours_2000",
    "heldout_rule_n8_threshold",
    "heldout_rule_n8_gemma3_10",
    "heldout_rule_n8_b13_threshold",
    "heldout_rule_gemma3_budget30_10",
    "heldout_rule_gemma3_budget23_10",
    "heldout_rule_smooth8_threshold",
    "heldout_rule_smooth8_threshold_more",
    "heldout_rule_smooth8_gemma3_budget23_10",
    "heldout_rule_smooth8_b0_threshold",
    "heldout_rule_smooth8_b0_threshold_more",
)


RENDERERS = {
    "profile_observation": render_benchmark("profile_observation", "profile_observation", describe_profile),
    "profile_observation_gpu_llama1b": render_benchmark("profile_observation_gpu_llama1b", "profile_observation", describe_profile),
    **{name: render_benchmark(name, "long_context", describe_long_context(name), plot=True)
       for name in ("long_context", "long_context_gpu_llama1b", "long_context_gpu_llama8b")},
    "ruler_smollm2": render_ruler_smollm2,
    **{name: render_heldout(name) for name in HELDOUT_BLOCKS},
    "overhead_memory": render_overhead_memory,
    "policy_overhead": render_policy_overhead,
    "compare_smollm2": render_compare_smollm2,
    "compare_gemma3": render_compare_gemma3,
}


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
