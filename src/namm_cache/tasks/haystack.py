"""Haystack tasks: facts hidden in long prose or filler, and long-text continuation.

Every task samples `Example`s (a prompt and its expected continuation) from a seeded `random.Random`, so
every member of an evolution generation sees the same prompts and a resumed run sees what an uninterrupted
one saw. They are scored by the teacher-forced probability of the answer (and, held out, by greedy answers).
"""

from __future__ import annotations

import random
import string
from typing import Any

from ..validation import check_int
from .base import Example, Task, register_task
from .prompts import TRAINING_TEXT, haystack_prompt, load_text, passkey_fields

MAX_ANSWER_TOKENS = 16  # the haystack tasks' answers (a 5- or 7-digit number) take fewer tokens than this


class HaystackTask(Task):
    """Facts hidden in a haystack (filler or prose) and a question about them. Subclasses draw the facts."""

    def __init__(self, tokens: int = 1000, haystack: str = "filler"):
        self.tokens = check_int(f"{self.name}.tokens", tokens, minimum=1)
        self.source = haystack  # the text's name or path: keeps training and held-out texts apart
        self.haystack = load_text(haystack)

    def context_tokens(self) -> int:
        return self.tokens + MAX_ANSWER_TOKENS

    def draw(self, rng: random.Random) -> dict[str, Any]:
        """The needles, instruction, question, answer_prefix and answer of one example."""
        raise NotImplementedError

    def sample(self, tokenizer, rng, n):
        return [self.render(tokenizer, rng, self.draw(rng)) for _ in range(n)]

    def render(self, tokenizer, rng: random.Random, fields: dict[str, Any]) -> Example:
        """The `Example` of drawn `fields` (`draw`'s, needles possibly moved): the prompt on a haystack passage from
        an offset drawn from `rng`, the needle sentences as evidence."""
        fields = dict(fields)
        answer = fields.pop("answer")
        prompt = haystack_prompt(tokenizer, self.tokens, haystack=self.haystack, haystack_offset=rng.randrange(10**6), **fields)
        return Example(prompt, answer, self.name, evidence=needle_spans(prompt, fields["needles"]))


def needle_spans(prompt: str, needles: list[tuple[float, str]]) -> list[tuple[int, int]]:
    """The `(start, end)` character span of each needle sentence in `prompt`, in prompt order (the evidence).

    Needles sit in the prompt in depth order (`haystack_prompt`), so each is searched after the previous one."""
    spans = []
    for _, sentence in sorted(needles):
        start = prompt.find(sentence, spans[-1][1] if spans else 0)
        if start < 0:
            raise ValueError(f"The needle {sentence!r} is not in the prompt (too few tokens for it?).")
        spans.append((start, start + len(sentence)))
    return spans


@register_task("passkey")
class PasskeyTask(HaystackTask):
    """Retrieve a 5-digit pass key hidden at a random depth in filler or prose."""

    name = "passkey"

    def draw(self, rng):
        key = str(rng.randint(10000, 99999))  # drawn before the depth: the held-out prompts depend on this order
        return passkey_fields(key, rng.uniform(0.05, 0.95))


WORDS = ["apple", "river", "candle", "falcon", "garden", "harbor", "lantern", "meadow", "orchard", "pebble", "quartz", "saddle"]


@register_task("needle")
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


@register_task("variable_tracking")
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


@register_task("long_text")
class LongTextTask(Task):
    """Long-text log-likelihood: a passage of `tokens` tokens, then predict the next `answer_tokens` tokens."""

    name = "long_text"

    def __init__(self, tokens: int = 1000, text: str = TRAINING_TEXT, answer_tokens: int = 32):
        self.tokens = check_int("long_text.tokens", tokens, minimum=1)
        self.answer_tokens = check_int("long_text.answer_tokens", answer_tokens, minimum=1)
        self.source = text
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


register_task("needle_multikey", lambda **arguments: NeedleTask(**{"keys": 3, **arguments}))
