"""Datasets of the namm-cache task pack, built locally from a tokenizer (no downloads).

The prompts are the held-out suite's (`namm_cache.tasks.heldout_examples`: its seed, `kjv_proverbs`
haystacks), one task at a time. Each task's `metadata` sets `tokens` (prompt length), `samples` and
`haystack`; `--metadata` on the command line overrides them, e.g. `--metadata='{"tokens": 2000, "samples": 50}'`.
The tokenizer is the evaluated model's (`pretrained` / `tokenizer` model args, or an offline model name).
"""

from __future__ import annotations

from typing import Any

import datasets

from namm_cache.tasks import HELDOUT_TEXT, METRICS, JsonlTask, heldout_examples, is_correct


def load_tokenizer(kwargs: dict[str, Any]):
    """The evaluated model's tokenizer: `tokenizer` or `pretrained` (offline model names resolve to their folders)."""
    from transformers import AutoTokenizer

    from namm_cache.offline import OFFLINE_MODELS, ensure_converted

    name = kwargs.get("tokenizer") or kwargs.get("pretrained") or "smollm2-135m-instruct"
    if name in OFFLINE_MODELS:
        name = str(ensure_converted(name))
    return AutoTokenizer.from_pretrained(name)


def _build(task_name: str, **kwargs: Any) -> dict[str, datasets.Dataset]:
    tokens = int(kwargs.get("tokens", 1000))
    samples = int(kwargs.get("samples", 20))
    spec = {"name": task_name, "tokens": tokens, "haystack": kwargs.get("haystack", HELDOUT_TEXT)}
    if task_name == "variable_tracking":
        spec["hops"] = int(kwargs.get("hops", 3))
    examples = heldout_examples(load_tokenizer(kwargs), samples, tasks=[spec])
    rows = [{"prompt": e.prompt, "answer": e.answer.strip(), "tokens": tokens} for e in examples]
    return {"test": datasets.Dataset.from_list(rows)}


def passkey(**kwargs: Any):
    return _build("passkey", **kwargs)


def needle(**kwargs: Any):
    return _build("needle", **kwargs)


def needle_multikey(**kwargs: Any):
    return _build("needle_multikey", **kwargs)


def variable_tracking(**kwargs: Any):
    return _build("variable_tracking", **kwargs)


def exact_answer(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1 if the completion is the answer (`namm_cache.tasks.is_correct`: "123456" does not answer "12345")."""
    return {"exact_match": float(is_correct(results[0], doc["answer"]))}


def longbench(**kwargs: Any):
    """LongBench / InfiniteBench-format records from a local JSONL file: `--metadata '{"path": "...jsonl"}'`.

    Records need `context`, `input` and `answers`; optional `max_context_chars` truncates long contexts."""
    path = kwargs.get("path")
    if not path:
        raise ValueError('namm_longbench needs the data file: --metadata \'{"path": "/data/hotpotqa.jsonl"}\'.')
    task = JsonlTask(str(path), name=kwargs.get("dataset"), metric=kwargs.get("metric"),
                     max_context_chars=kwargs.get("max_context_chars"))
    rows = [{"prompt": task.prompt(record), "answers": [str(a) for a in record["answers"]], "metric": task.metric}
            for record in task.records]
    return {"test": datasets.Dataset.from_list(rows)}


def longbench_score(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The dataset's official LongBench metric (max over reference answers)."""
    metric = METRICS[doc["metric"]]
    return {"score": max(metric(results[0], answer) for answer in doc["answers"])}
