"""Tasks: long prompts with a known answer, for the demo, evolution, held-out evaluation, benchmarks and lm-eval.

A task samples `Example`s (prompt, expected continuation) from a seeded `random.Random`; `build_task` builds
one by name from the registry (`register_task`). `is_correct` is the one answer check; `heldout_examples` the
one held-out suite.
"""

from .base import TASKS, Example, Task, build_task, is_correct, register_task, token_ids
from .haystack import HaystackTask, LongTextTask, NeedleTask, PasskeyTask, VariableTrackingTask
from .heldout import HELDOUT_SEED, HELDOUT_TASKS, heldout_examples, heldout_tasks
from .longbench import LONGBENCH_METRICS, METRICS, JsonlTask, qa_f1_score, rouge_l_score
from .prompts import (FILLER, HELDOUT_TEXT, TEXTS, TRAINING_TEXT, PasskeyPrompt, fit_to_tokens, haystack_prompt, load_text,
                      passkey_prompt)

__all__ = [
    "TASKS", "Example", "Task", "build_task", "is_correct", "register_task", "token_ids",
    "HaystackTask", "LongTextTask", "NeedleTask", "PasskeyTask", "VariableTrackingTask",
    "HELDOUT_SEED", "HELDOUT_TASKS", "heldout_examples", "heldout_tasks",
    "LONGBENCH_METRICS", "METRICS", "JsonlTask", "qa_f1_score", "rouge_l_score",
    "FILLER", "HELDOUT_TEXT", "TEXTS", "TRAINING_TEXT", "PasskeyPrompt", "fit_to_tokens", "haystack_prompt", "load_text",
    "passkey_prompt",
]
