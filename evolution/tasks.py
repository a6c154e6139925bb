"""Fitness tasks: long prompts whose answer depends on what the cache kept.

Every task samples `Example`s (a prompt and its expected continuation) from a seeded `random.Random`, so
every member of a generation sees the same prompts and a resumed run sees what an uninterrupted one saw.
Examples are scored by the teacher-forced probability of the answer (`score="logprob"`: the geometric
mean of the answer tokens' probabilities), or by greedy generation and a metric (`score="generate"`,
used by the LongBench-format loader with each dataset's official metric).
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from namm_cache.prompts import FILLER, haystack_prompt
from namm_cache.validation import check_int

DATA = Path(__file__).resolve().parent / "data"
TEXTS = {
    "filler": None,
    "kjv_genesis": DATA / "kjv_genesis.txt",  # training haystacks
    "kjv_proverbs": DATA / "kjv_proverbs.txt",  # held-out haystacks
}


def load_text(source: str) -> str:
    """Haystack text by name (`filler`, `kjv_genesis`, `kjv_proverbs`) or a path to a UTF-8 text file."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"A haystack / text must be a name ({', '.join(sorted(TEXTS))}) or a file path, got {source!r}.")
    if source == "filler":
        return FILLER * 4
    path = TEXTS.get(source) or Path(source)
    if not Path(path).is_file():
        raise FileNotFoundError(f"Haystack text {source!r} not found; use one of {sorted(TEXTS)} or a path to a text file.")
    return Path(path).read_text()


@dataclass
class Example:
    """A prompt (text fed through the cache) and its expected continuation."""

    prompt: str
    answer: str
    task: str
    answers: list[str] | None = None  # all acceptable answers (generation metrics)
    metric: str = "logprob"


class Task:
    """A source of examples. `score` is "logprob" (teacher-forced answer probability) or "generate"."""

    name = "task"
    score = "logprob"

    def sample(self, tokenizer: Any, rng: random.Random, n: int) -> list[Example]:
        raise NotImplementedError

    def context_tokens(self) -> int | None:
        """An upper bound on prompt + answer tokens of an example (None: unknown until the data is tokenized)."""
        return None


MAX_ANSWER_TOKENS = 16  # the haystack tasks' answers (a 5- or 7-digit number) take fewer tokens than this


class HaystackTask(Task):
    """Facts hidden in a haystack (filler or prose) and a question about them. Subclasses draw the facts."""

    def __init__(self, tokens: int = 1000, haystack: str = "filler"):
        self.tokens = check_int(f"{self.name}.tokens", tokens, minimum=1)
        self.haystack = load_text(haystack)

    def context_tokens(self) -> int:
        return self.tokens + MAX_ANSWER_TOKENS

    def draw(self, rng: random.Random) -> dict[str, Any]:
        """The needles, instruction, question, answer_prefix and answer of one example."""
        raise NotImplementedError

    def sample(self, tokenizer, rng, n):
        examples = []
        for _ in range(n):
            fields = self.draw(rng)
            prompt = haystack_prompt(tokenizer, self.tokens, haystack=self.haystack, haystack_offset=rng.randrange(10**6), **fields)
            examples.append(Example(prompt.text, prompt.answer, self.name))
        return examples


class PasskeyTask(HaystackTask):
    """Retrieve a 5-digit pass key hidden at a random depth in filler or prose."""

    name = "passkey"

    def draw(self, rng):
        key = str(rng.randint(10000, 99999))
        return {
            "needles": [(rng.uniform(0.05, 0.95), f"The pass key is {key}. Remember it. {key} is the pass key.")],
            "instruction": "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the pass key.",
            "question": "What is the pass key? Answer with the number only.",
            "answer_prefix": "The pass key is",
            "answer": f" {key}",
        }


WORDS = ["apple", "river", "candle", "falcon", "garden", "harbor", "lantern", "meadow", "orchard", "pebble", "quartz", "saddle"]


class NeedleTask(HaystackTask):
    """Needle in a haystack with `keys` needles ("The special magic number for K is V."); one is asked."""

    name = "needle"

    def __init__(self, tokens: int = 1000, haystack: str = "filler", keys: int = 1):
        keys = check_int("needle.keys", keys, minimum=1, maximum=len(WORDS))
        super().__init__(tokens, haystack)
        self.keys = keys
        self.name = "needle" if keys == 1 else f"needle_multikey{keys}"

    def draw(self, rng):
        names = rng.sample(WORDS, self.keys)
        values = [str(rng.randint(1000000, 9999999)) for _ in names]
        target = rng.randrange(self.keys)
        return {
            "needles": [(rng.uniform(0.05, 0.95), f"The special magic number for {k} is: {v}.") for k, v in zip(names, values)],
            "instruction": "Some special magic numbers are hidden inside the following text. Make sure to memorize them.",
            "question": f"What is the special magic number for {names[target]} mentioned in the text?",
            "answer_prefix": f"The special magic number for {names[target]} is:",
            "answer": f" {values[target]}",
        }


class VariableTrackingTask(HaystackTask):
    """Follow a chain of assignments (VAR B = A ...) scattered in filler; ask the value of the last one."""

    name = "variable_tracking"

    def __init__(self, tokens: int = 1000, haystack: str = "filler", hops: int = 4):
        super().__init__(tokens, haystack)
        self.hops = check_int("variable_tracking.hops", hops, minimum=1)

    def draw(self, rng):
        names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(5)) for _ in range(self.hops + 1)]
        value = str(rng.randint(10000, 99999))
        statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, self.hops + 1)]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in statements)
        return {
            "needles": list(zip(depths, statements)),
            "instruction": "Memorize and track the chain of variable assignments hidden in the following text.",
            "question": f"What is the value of VAR {names[-1]}? Answer with the number only.",
            "answer_prefix": f"VAR {names[-1]} =",
            "answer": f" {value}",
        }


class LongTextTask(Task):
    """Long-text log-likelihood: a passage of `tokens` tokens, then predict the next `answer_tokens` tokens."""

    name = "long_text"

    def __init__(self, tokens: int = 1000, text: str = "kjv_genesis", answer_tokens: int = 32):
        self.tokens = check_int("long_text.tokens", tokens, minimum=1)
        self.answer_tokens = check_int("long_text.answer_tokens", answer_tokens, minimum=1)
        self.text = load_text(text)

    def context_tokens(self) -> int:
        return self.tokens + self.answer_tokens

    def sample(self, tokenizer, rng, n):
        ids = tokenizer(self.text, add_special_tokens=False)["input_ids"]
        span = self.tokens + self.answer_tokens
        if len(ids) <= span:
            raise ValueError(f"The text has {len(ids)} tokens; {self.name} needs more than {span}.")
        examples = []
        for _ in range(n):
            start = rng.randrange(len(ids) - span)
            prompt = tokenizer.decode(ids[start : start + self.tokens])
            answer = tokenizer.decode(ids[start + self.tokens : start + span])
            examples.append(Example(prompt, answer, self.name))
        return examples


# ------------------------------------------------------------------------------------ LongBench format
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

    def sample(self, tokenizer, rng, n):
        chosen = [self.records[rng.randrange(len(self.records))] for _ in range(n)]
        examples = []
        for record in chosen:
            context = record["context"][: self.max_context_chars] if self.max_context_chars else record["context"]
            prompt = f"{context}\n\nQuestion: {record['input']}\nAnswer:"
            answers = [str(a) for a in record["answers"]]
            examples.append(Example(prompt, " " + answers[0], self.name, answers=answers, metric=self.metric))
        return examples


TASKS: dict[str, Callable[..., Task]] = {
    "passkey": PasskeyTask,
    "needle": NeedleTask,
    "needle_multikey": lambda **kw: NeedleTask(**{"keys": 3, **kw}),
    "variable_tracking": VariableTrackingTask,
    "long_text": LongTextTask,
    "jsonl": JsonlTask,
}


def build_task(spec: dict[str, Any] | str) -> Task:
    """Build a task from `{"name": ..., **arguments}` (or just a name)."""
    if not isinstance(spec, (str, dict)):
        raise ValueError(f"A task must be a name or a mapping like {{name: passkey, tokens: 1000}}, got {spec!r}.")
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; known tasks: {sorted(TASKS)}.")
    try:
        return TASKS[name](**spec)
    except TypeError as error:
        raise ValueError(f"Bad arguments for task {name!r}: {error}") from None
