"""Long prompts with a known answer (passkey retrieval), for demos, tests and benchmarks."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


@dataclass
class PasskeyPrompt:
    """A chat-formatted passkey prompt.

    Attributes:
        text: the prompt, ending with the start of the answer ("The pass key is").
        passkey: the digits the model must produce.
        depth: relative position of the needle in the haystack (0 = start, 1 = end).
    """

    text: str
    passkey: str
    depth: float

    def is_answered(self, completion: str) -> bool:
        """True if the completion's first number is the passkey."""
        digits = "".join(ch if ch.isdigit() else " " for ch in completion).split()
        return bool(digits) and digits[0] == self.passkey


@dataclass
class HaystackPrompt:
    """A long prompt with facts hidden in a haystack, and the answer to a question about them."""

    text: str
    answer: str

    def is_answered(self, completion: str) -> bool:
        return completion.strip().lower().startswith(self.answer.strip().lower())


def fit_to_tokens(tokenizer: Any, n_tokens: int, render) -> str:
    """The largest `render(k)` (k = haystack words) whose token count is <= n_tokens (binary search)."""
    low, high = 0, max(16, n_tokens)
    while low < high:
        mid = (low + high + 1) // 2
        if len(tokenizer(render(mid), add_special_tokens=False)["input_ids"]) <= n_tokens:
            low = mid
        else:
            high = mid - 1
    return render(low)


def haystack_prompt(
    tokenizer: Any,
    n_tokens: int,
    *,
    needles: list[tuple[float, str]],
    instruction: str,
    question: str,
    answer_prefix: str,
    answer: str,
    haystack: str = FILLER,
    haystack_offset: int = 0,
) -> HaystackPrompt:
    """Hide `needles` (relative depth, sentence) in `haystack` text and ask `question` (chat template applied).

    The prompt ends with `answer_prefix`, so the expected continuation is `answer`.
    """
    source_words = haystack.split()
    if not source_words:
        raise ValueError("The haystack text is empty.")

    def render(filler_words: int) -> str:
        words = [source_words[(haystack_offset + i) % len(source_words)] for i in range(filler_words)]
        pieces, last = [], 0
        for depth, sentence in sorted(needles):
            cut = int(len(words) * depth)
            pieces.append(" ".join(words[last:cut]))
            pieces.append(sentence)
            last = cut
        pieces.append(" ".join(words[last:]))
        user = instruction + "\n" + " ".join(piece for piece in pieces if piece) + "\n" + question
        if getattr(tokenizer, "chat_template", None):
            chat = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
            return chat + answer_prefix
        return user + "\n" + answer_prefix

    return HaystackPrompt(text=fit_to_tokens(tokenizer, n_tokens, render), answer=answer)


def passkey_prompt(
    tokenizer: Any,
    n_tokens: int,
    *,
    passkey: str | None = None,
    depth: float = 0.5,
    seed: int = 0,
    haystack: str = FILLER,
) -> PasskeyPrompt:
    """Build a passkey prompt of about `n_tokens` tokens (chat template applied when the tokenizer has one).

    The answer is started for the model ("The pass key is"), since small models otherwise tend to repeat
    the needle sentence instead of the digits.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}.")
    rng = random.Random(seed)
    passkey = passkey or str(rng.randint(10000, 99999))
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    question = "What is the pass key? Answer with the number only."
    intro = (
        "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the pass key.\n"
    )

    def render(filler_words: int) -> str:
        words = (haystack * (filler_words // max(1, len(haystack.split())) + 2)).split()[:filler_words]
        cut = int(len(words) * depth)
        body = " ".join(words[:cut]) + needle + " ".join(words[cut:])
        user = intro + body + "\n" + question
        if getattr(tokenizer, "chat_template", None):
            chat = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
            return chat + "The pass key is"
        return user + "\nThe pass key is"

    low, high = 0, max(16, n_tokens)
    while low < high:  # the largest filler whose prompt fits in n_tokens
        mid = (low + high + 1) // 2
        if len(tokenizer(render(mid), add_special_tokens=False)["input_ids"]) <= n_tokens:
            low = mid
        else:
            high = mid - 1
    return PasskeyPrompt(text=render(low), passkey=passkey, depth=depth)
