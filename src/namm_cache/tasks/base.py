"""Examples, the task contract and registry, and the one answer check."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any, Callable

import torch


def is_correct(completion: str, answer: str) -> bool:
    """The answer check used everywhere (demo, held-out accuracy, benchmarks, the lm-eval pack).

    True when the completion starts with the whole answer: leading whitespace and punctuation are skipped
    (" **12345**." answers "12345"), case is ignored, and the answer must end where the completion's word or
    number ends, so "123456" does not answer "12345" and "Frances" does not answer "France".
    """
    skip = string.whitespace + string.punctuation
    expected = answer.strip().lstrip(skip).lower()
    if not expected:
        raise ValueError(f"The answer to check against is empty ({answer!r}).")
    given = completion.lstrip(skip).lower()
    if not given.startswith(expected):
        return False
    rest = given[len(expected):]
    return not rest or not rest[0].isalnum()


def token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """`text` as a (1, tokens) id tensor, without special tokens (prompts carry their own chat template)."""
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)


@dataclass
class Example:
    """A prompt (text fed through the cache) and its expected continuation.

    `metric` says how it is scored: "logprob" (the teacher-forced probability of `answer`) or the name of a
    generation metric in `namm_cache.tasks.METRICS` (a greedy answer scored against `answers`).
    `evidence`, where a task knows it, lists the `(start, end)` character spans of `prompt` that hold what the
    answer needs (the haystack tasks' needle sentences); `evidence_positions` turns them into token positions,
    which the oracle policy (`namm_cache.policies.OraclePolicy`) keeps.
    """

    prompt: str
    answer: str
    task: str
    answers: list[str] | None = None  # all acceptable answers (generation metrics)
    metric: str = "logprob"
    evidence: list[tuple[int, int]] | None = None  # character spans of `prompt` the answer depends on

    def is_correct(self, completion: str) -> bool:
        """Whether a greedy completion of `prompt` is `answer` (see `is_correct`)."""
        return is_correct(completion, self.answer)

    def evidence_positions(self, tokenizer: Any) -> list[int]:
        """Token positions (indices into `token_ids(tokenizer, prompt)`) of every token overlapping an evidence span.

        Needs a tokenizer that reports character offsets (a "fast" tokenizer); raises `ValueError` when the
        example has no evidence."""
        if not self.evidence:
            raise ValueError(f"This {self.task!r} example carries no evidence spans.")
        encoded = tokenizer(self.prompt, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        return [i for i, (start, end) in enumerate(offsets)
                if end > start and any(start < span_end and end > span_start for span_start, span_end in self.evidence)]


class Task:
    """A source of examples. Subclasses set `name` and implement `sample`; register them with `register_task`."""

    name = "task"

    def sample(self, tokenizer: Any, rng: random.Random, n: int) -> list[Example]:
        """`n` examples drawn from `rng` only (the same generator state gives the same examples)."""
        raise NotImplementedError

    def context_tokens(self) -> int | None:
        """An upper bound on prompt + answer tokens of an example (None: unknown until the data is tokenized)."""
        return None


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task] | None = None):
    """Make `build_task({"name": name, ...})` call `factory(**arguments)`: a class decorator, or a call with a factory.

    Evolution configs, the held-out suite and the lm-eval pack all build tasks by name through this registry."""

    def add(factory: Callable[..., Task]) -> Callable[..., Task]:
        if TASKS.get(name, factory) is not factory:
            raise ValueError(f"A task named {name!r} is already registered ({TASKS[name]!r}).")
        TASKS[name] = factory
        return factory

    return add if factory is None else add(factory)


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
