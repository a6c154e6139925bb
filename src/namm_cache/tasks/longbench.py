"""LongBench / InfiniteBench-format records from local JSONL, and LongBench's official metrics.

Examples are scored by the teacher-forced probability of the first reference answer (`score="logprob"`, the
default, cheaper) or by a greedy answer and the dataset's metric (`score="generate"`).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..validation import check_int
from .base import Example, Task, register_task


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 after SQuAD-style normalisation (LongBench's metric for its English QA sets)."""
    pred, truth = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    common = Counter(pred) & Counter(truth)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def rouge_l_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F-measure on whitespace tokens (longest common subsequence), for summarisation sets."""
    a, b = prediction.lower().split(), ground_truth.lower().split()
    if not a or not b:
        return 0.0
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, ground_truth: str) -> float:
    return float(ground_truth.strip().lower() in prediction.strip().lower())


def retrieval_score(prediction: str, ground_truth: str) -> float:
    numbers = re.findall(r"\d+", ground_truth)
    return float(bool(numbers) and numbers[0] in re.findall(r"\d+", prediction))


def code_sim_score(prediction: str, ground_truth: str) -> float:
    from difflib import SequenceMatcher

    line = next((l for l in prediction.lstrip("\n").split("\n") if not l.strip().startswith(("`", "#", "//"))), "")
    return SequenceMatcher(None, line, ground_truth).ratio()


METRICS: dict[str, Callable[[str, str], float]] = {
    "qa_f1": qa_f1_score,
    "rouge_l": rouge_l_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "code_sim": code_sim_score,
    "exact_match": lambda p, t: float(normalize_answer(p) == normalize_answer(t)),
}
# LongBench's official metric per dataset (plain functions above; no Hub-hosted metric scripts).
LONGBENCH_METRICS = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1", "2wikimqa": "qa_f1",
    "musique": "qa_f1", "gov_report": "rouge_l", "qmsum": "rouge_l", "multi_news": "rouge_l", "trec": "classification",
    "triviaqa": "qa_f1", "samsum": "rouge_l", "passage_retrieval_en": "retrieval", "passage_count": "exact_match",
    "lcc": "code_sim", "repobench-p": "code_sim",
}


@register_task("jsonl")
class JsonlTask(Task):
    """LongBench / InfiniteBench-format records from a local JSONL file (or a `datasets` dataset name).

    Each record needs `context`, `input` and `answers` (a list); the prompt is
    `"{context}\\n\\nQuestion: {input}\\nAnswer:"`. With `score="generate"`, greedy answers are scored with the
    dataset's metric (`metric=` or LongBench's official one by dataset name); with `score="logprob"`, the
    teacher-forced probability of the first reference answer is used (cheaper).
    """

    def __init__(self, path: str, name: str | None = None, metric: str | None = None, score: str = "logprob",
                 max_context_chars: int | None = None, split: str = "test"):
        if not isinstance(path, str) or not path:
            raise ValueError(f"jsonl.path must be a file path, got {path!r}.")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"jsonl.name must be a string, got {name!r}.")
        self.path = path
        self.name = name or Path(path).stem
        metric = metric or LONGBENCH_METRICS.get(self.name, "qa_f1")
        if not isinstance(metric, str) or metric not in METRICS:
            raise ValueError(f"Unknown metric {metric!r}; known: {sorted(METRICS)}.")
        if not isinstance(score, str) or score not in ("logprob", "generate"):
            raise ValueError(f"score must be 'logprob' or 'generate', got {score!r}.")
        if not isinstance(split, str):
            raise ValueError(f"jsonl.split must be a string, got {split!r}.")
        max_context_chars = check_int("jsonl.max_context_chars", max_context_chars, minimum=1, optional=True)
        self.metric, self.score, self.max_context_chars = metric, score, max_context_chars
        self.records = self._load(path, split)

    @staticmethod
    def _load(path: str, split: str) -> list[dict]:
        if Path(path).is_file():
            records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        elif Path(path).suffix in (".jsonl", ".json"):
            raise FileNotFoundError(f"Data file {path!r} not found.")
        else:
            try:
                import datasets
            except ImportError as error:  # pragma: no cover
                raise FileNotFoundError(f"{path!r} is not a file and `datasets` is not installed to load it by name.") from error
            records = list(datasets.load_dataset(path, split=split))
        for i, record in enumerate(records):
            missing = {"context", "input", "answers"} - set(record)
            if missing:
                raise ValueError(f"{path}: record {i} lacks {sorted(missing)} (LongBench format needs context, input, answers).")
        if not records:
            raise ValueError(f"{path}: no records.")
        return records

    def prompt(self, record: dict[str, Any]) -> str:
        """A record's prompt: its context (cut to `max_context_chars`), then the question."""
        context = record["context"][: self.max_context_chars] if self.max_context_chars else record["context"]
        return f"{context}\n\nQuestion: {record['input']}\nAnswer:"

    def sample(self, tokenizer, rng, n):
        chosen = [self.records[rng.randrange(len(self.records))] for _ in range(n)]
        examples = []
        for record in chosen:
            answers = [str(a) for a in record["answers"]]
            # The example's metric decides how it is scored: "logprob" takes the teacher-forced path.
            metric = "logprob" if self.score == "logprob" else self.metric
            examples.append(Example(self.prompt(record), " " + answers[0], self.name, answers=answers, metric=metric))
        return examples
