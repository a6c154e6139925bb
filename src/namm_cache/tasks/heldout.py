"""The held-out suite: the prompts every held-out number in this project is measured on.

`heldout_examples` is the one definition, used by `python -m namm_cache.evolution.evaluate`,
`benchmarks/compare.py` and the lm-eval pack (`namm_pack`). Its haystacks are `kjv_proverbs` (training
uses `kjv_genesis`) and its seed is never used by a training run (those draw prompts from
`seed * 1000003 + generation * 7919`).
"""

from __future__ import annotations

import random
from typing import Any

from .base import Example, build_task
from .prompts import HELDOUT_TEXT, TRAINING_TEXT

HELDOUT_SEED = 987_654_321  # the README's held-out tables were measured with this seed


def heldout_tasks(tokens: int = 1000) -> list[dict[str, Any]]:
    """The suite's task specs at a prompt length: pass key, one needle, 3-hop variable tracking, long text."""
    return [
        {"name": "passkey", "tokens": tokens, "haystack": HELDOUT_TEXT},
        {"name": "needle", "tokens": tokens, "haystack": HELDOUT_TEXT},
        {"name": "variable_tracking", "tokens": tokens, "haystack": HELDOUT_TEXT, "hops": 3},
        {"name": "long_text", "tokens": tokens, "text": HELDOUT_TEXT, "answer_tokens": 32},
    ]


HELDOUT_TASKS = heldout_tasks()


def heldout_examples(tokenizer: Any, prompts_per_task: int, *, tokens: int = 1000,
                     tasks: list[dict[str, Any]] | None = None) -> list[Example]:
    """`prompts_per_task` examples of each task, in order, all drawn from one generator seeded with HELDOUT_SEED.

    `tasks` replaces the suite's task specs (the lm-eval pack builds one task at a time); none may use the
    training text."""
    tasks = heldout_tasks(tokens) if tasks is None else tasks
    rng = random.Random(HELDOUT_SEED)
    examples: list[Example] = []
    for spec in tasks:
        task = build_task(spec)
        if getattr(task, "source", None) == TRAINING_TEXT:
            raise ValueError(f"Held-out task {spec!r} uses the training text {TRAINING_TEXT!r}; use {HELDOUT_TEXT!r}.")
        examples += task.sample(tokenizer, rng, prompts_per_task)
    return examples
