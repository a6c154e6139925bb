"""Datasets of the namm-cache task pack, built locally from a tokenizer (no downloads).

Each task's `metadata` sets `tokens` (prompt length), `samples` and `haystack`; `--metadata` on the
command line overrides them, e.g. `--metadata='{"tokens": 2000, "samples": 50}'`. The tokenizer is the
evaluated model's (`pretrained` / `tokenizer` model args, or an offline model name).
"""

from __future__ import annotations

import random
import re
from typing import Any

import datasets

HELDOUT_SEED = 20_241_126


def load_tokenizer(kwargs: dict[str, Any]):
    """The evaluated model's tokenizer: `tokenizer` or `pretrained` (offline model names resolve to their folders)."""
    from transformers import AutoTokenizer

    from namm_cache.offline import OFFLINE_MODELS, ensure_converted

    name = kwargs.get("tokenizer") or kwargs.get("pretrained") or "smollm2-135m-instruct"
    if name in OFFLINE_MODELS:
        name = str(ensure_converted(name))
    return AutoTokenizer.from_pretrained(name)


def _build(task_name: str, **kwargs: Any) -> dict[str, datasets.Dataset]:
    from evolution.tasks import build_task

    tokens = int(kwargs.get("tokens", 1000))
    samples = int(kwargs.get("samples", 20))
    spec = {"name": task_name, "tokens": tokens, "haystack": kwargs.get("haystack", "kjv_proverbs")}
    if task_name == "variable_tracking":
        spec["hops"] = int(kwargs.get("hops", 3))
    task = build_task(spec)
    tokenizer = load_tokenizer(kwargs)
    rng = random.Random(HELDOUT_SEED + tokens)
    rows = [{"prompt": e.prompt, "answer": e.answer.strip(), "tokens": tokens} for e in task.sample(tokenizer, rng, samples)]
    return {"test": datasets.Dataset.from_list(rows)}


def passkey(**kwargs: Any):
    return _build("passkey", **kwargs)


def needle(**kwargs: Any):
    return _build("needle", **kwargs)


def needle_multikey(**kwargs: Any):
    return _build("needle_multikey", **kwargs)


def variable_tracking(**kwargs: Any):
    return _build("variable_tracking", **kwargs)


def first_number(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1 if the first number in the completion is the answer."""
    found = re.findall(r"\d+", results[0])
    return {"exact_match": float(bool(found) and found[0] == doc["answer"])}


def longbench(**kwargs: Any):
    """LongBench / InfiniteBench-format records from a local JSONL file: `--metadata '{"path": "...jsonl"}'`.

    Records need `context`, `input` and `answers`; optional `max_context_chars` truncates long contexts."""
    from evolution.tasks import JsonlTask

    path = kwargs.get("path")
    if not path:
        raise ValueError('namm_longbench needs the data file: --metadata \'{"path": "/data/hotpotqa.jsonl"}\'.')
    task = JsonlTask(str(path), name=kwargs.get("dataset"), metric=kwargs.get("metric"),
                     max_context_chars=kwargs.get("max_context_chars"))
    rows = []
    for record in task.records:
        context = record["context"][: task.max_context_chars] if task.max_context_chars else record["context"]
        rows.append({"prompt": f"{context}\n\nQuestion: {record['input']}\nAnswer:",
                     "answers": [str(a) for a in record["answers"]], "metric": task.metric})
    return {"test": datasets.Dataset.from_list(rows)}


def longbench_score(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The dataset's official LongBench metric (max over reference answers)."""
    from evolution.tasks import METRICS

    metric = METRICS[doc["metric"]]
    return {"score": max(metric(results[0], answer) for answer in doc["answers"])}
