"""Haystack texts and prompt rendering: facts hidden at chosen depths, fitted to a token count."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..validation import check_int
from .base import is_correct

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
DATA = Path(__file__).resolve().parent / "data"
TRAINING_TEXT = "kjv_genesis"  # training haystacks (evolution configs)
HELDOUT_TEXT = "kjv_proverbs"  # held-out haystacks: the held-out suite and the lm-eval pack, never training
TEXTS = {
    "filler": None,
    TRAINING_TEXT: DATA / "kjv_genesis.txt",
    HELDOUT_TEXT: DATA / "kjv_proverbs.txt",
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


def fit_to_tokens(tokenizer: Any, n_tokens: int, render: Callable[[int], str]) -> str:
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
    haystack: str = FILLER,
    haystack_offset: int = 0,
) -> str:
    """Hide `needles` (relative depth, sentence) in `haystack` text and ask `question` (chat template applied).

    The prompt ends with `answer_prefix`, so the expected continuation is the answer. The haystack's words are
    read cyclically from word `haystack_offset`; as many as fit in `n_tokens` tokens are used.
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

    return fit_to_tokens(tokenizer, n_tokens, render)


def passkey_fields(passkey: str, depth: float) -> dict[str, Any]:
    """The needle, instruction, question, answer prefix and answer of a pass-key prompt (see `haystack_prompt`).

    The answer is started for the model ("The pass key is"): small models asked bare tend to repeat the needle
    sentence instead of the digits."""
    return {
        "needles": [(depth, f"The pass key is {passkey}. Remember it. {passkey} is the pass key.")],
        "instruction": "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the pass key.",
        "question": "What is the pass key? Answer with the number only.",
        "answer_prefix": "The pass key is",
        "answer": f" {passkey}",
    }


@dataclass
class PasskeyPrompt:
    """A chat-formatted pass-key prompt.

    Attributes:
        text: the prompt, ending with the start of the answer ("The pass key is").
        passkey: the digits the model must produce.
        depth: relative position of the needle in the haystack (0 = start, 1 = end).
    """

    text: str
    passkey: str
    depth: float

    def is_answered(self, completion: str) -> bool:
        """True if the completion is the pass key (`namm_cache.tasks.is_correct`: "123456" is not "12345")."""
        return is_correct(completion, self.passkey)


def passkey_prompt(
    tokenizer: Any,
    n_tokens: int,
    *,
    passkey: str | None = None,
    depth: float = 0.5,
    seed: int = 0,
    haystack: str = FILLER,
) -> PasskeyPrompt:
    """A pass-key prompt of at most `n_tokens` tokens with the key at `depth` (the `passkey` task's rendering).

    The key is drawn from `seed` unless given; `haystack` is the filler text. `ValueError` when `n_tokens` is
    not a positive integer or is too short to hold the prompt's question and key without any haystack."""
    n_tokens = check_int("n_tokens", n_tokens, minimum=1)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}.")
    passkey = passkey or str(random.Random(seed).randint(10000, 99999))
    fields = passkey_fields(passkey, depth)
    del fields["answer"]
    text = haystack_prompt(tokenizer, n_tokens, haystack=haystack, **fields)
    length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if length > n_tokens:
        raise ValueError(f"n_tokens={n_tokens} is too short for a pass-key prompt: its question and key alone take "
                         f"{length} tokens; ask for more.")
    return PasskeyPrompt(text=text, passkey=passkey, depth=depth)
