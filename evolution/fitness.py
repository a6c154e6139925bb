"""Evaluate a cache configuration on examples: teacher-forced answer probability or generation + metric."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from namm_cache import NAMMCache
from namm_cache.tasks import METRICS, Example, token_ids


@dataclass
class ExampleResult:
    score: float  # in [0, 1]: geometric-mean answer-token probability, or the generation metric
    kept_fraction: float  # mean fraction of real tokens kept over NAMM layers, at the end of the prompt


@torch.no_grad()
def answer_logprob(model, cache, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, chunk: int) -> float:
    """Mean log-probability of `answer_ids` after feeding `prompt_ids` through `cache` in chunks (teacher forced)."""
    logits = None
    for part in prompt_ids.split(chunk, dim=1):
        logits = model(input_ids=part.to(model.device), cache=cache, use_cache=True).logits
    first = torch.log_softmax(logits[:, -1].float(), dim=-1)[0, answer_ids[0, 0]]
    total, count = first.item(), 1
    if answer_ids.shape[1] > 1:
        rest = model(input_ids=answer_ids[:, :-1].to(model.device), cache=cache, use_cache=True).logits
        logprobs = torch.log_softmax(rest.float(), dim=-1)[0]
        total += logprobs.gather(-1, answer_ids[0, 1:].unsqueeze(-1).to(logprobs.device)).sum().item()
        count += answer_ids.shape[1] - 1
    return total / count


@torch.no_grad()
def generate_answer(model, tokenizer, cache, prompt_ids: torch.Tensor, chunk: int, max_new_tokens: int) -> str:
    out = model.generate(prompt_ids.to(model.device), attention_mask=torch.ones_like(prompt_ids).to(model.device), cache=cache,
                         max_new_tokens=max_new_tokens, do_sample=False, prefill_chunk_size=chunk,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True)


def answers_correctly(model, tokenizer, cache, example: Example, chunk: int, max_new_tokens: int = 8) -> bool:
    """Whether the greedy answer to `example.prompt` through `cache` is `example.answer` (`Example.is_correct`)."""
    completion = generate_answer(model, tokenizer, cache, token_ids(tokenizer, example.prompt), chunk, max_new_tokens)
    return example.is_correct(completion)


@dataclass
class ScoredAnswer:
    """One prompt through one cache: the teacher-forced answer score and the greedy completion."""

    score: float  # geometric-mean probability of the reference answer's tokens
    kept_fraction: float  # as ExampleResult: after the teacher-forced answer
    completion: str  # the greedy continuation (at most max_new_tokens, cut at the end-of-sequence token)
    correct: bool  # `example.is_correct(completion)`
    prefill_peak_kv_bytes: int  # the cache's peak KV after the prompt, before it was split into two rows


@torch.no_grad()
def score_and_answer(model, tokenizer, cache, example: Example, chunk: int, max_new_tokens: int = 8) -> ScoredAnswer:
    """`evaluate_examples` (teacher-forced score) and `answers_correctly` (greedy answer) of one logprob example
    with a single prefill: the prompt goes through `cache` once, the cache is then split into two batch rows,
    and row 0 reads the reference answer while row 1 decodes greedily, step by step in one batch.

    Rows of a `NAMMCache` evict independently, so each row holds what a cache of its own would hold; the two
    results equal the two separate runs (up to batched-kernel rounding), for half the prefill work."""
    prompt_ids = token_ids(tokenizer, example.prompt).to(model.device)
    answer_ids = token_ids(tokenizer, example.answer).to(model.device)
    eos = tokenizer.eos_token_id
    logits = None
    for part in prompt_ids.split(chunk, dim=1):
        logits = model(input_ids=part, cache=cache, use_cache=True).logits[:, -1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)[0]
    total = float(logprobs[answer_ids[0, 0]])
    generated = [int(logprobs.argmax())]
    steps = max(answer_ids.shape[1] - 1, max_new_tokens - 1)
    kept = kept_fraction(cache, 0) if answer_ids.shape[1] == 1 else None  # the answer needs no more input
    peak = getattr(cache, "peak_kv_bytes", 0)
    cache.batch_repeat_interleave(2)
    for step in range(steps):
        reading = step < answer_ids.shape[1] - 1
        decoding = len(generated) < max_new_tokens and (eos is None or generated[-1] != eos)
        if not (reading or decoding):
            break
        filler = int(answer_ids[0, -1])  # row 0 after the answer: any token (its outputs are not used)
        tokens = torch.tensor([[int(answer_ids[0, step]) if reading else filler], [generated[-1]]], device=model.device)
        logprobs = torch.log_softmax(model(input_ids=tokens, cache=cache, use_cache=True).logits[:, -1].float(), dim=-1)
        if reading:
            total += float(logprobs[0, answer_ids[0, step + 1]])
        if decoding:
            generated.append(int(logprobs[1].argmax()))
        if step == answer_ids.shape[1] - 2:
            kept = kept_fraction(cache, 0)
    if eos is not None and eos in generated:
        generated = generated[: generated.index(eos)]
    completion = tokenizer.decode(generated, skip_special_tokens=True)
    return ScoredAnswer(score=math.exp(total / answer_ids.shape[1]), kept_fraction=kept, completion=completion,
                        correct=example.is_correct(completion), prefill_peak_kv_bytes=peak)


def mean_kept_fraction(results: list[ExampleResult]) -> float:
    """Mean over examples of the fraction of real tokens kept."""
    return sum(r.kept_fraction for r in results) / len(results)


def kept_fraction(cache: Any, row: int | None = None) -> float:
    """Kept real tokens / real tokens seen in a NAMMCache (batch `row`, or all rows); 1.0 for other caches."""
    value = cache.kept_fraction(row) if isinstance(cache, NAMMCache) else None
    return 1.0 if value is None else float(value)


def evaluate_examples(
    model,
    tokenizer,
    examples: list[Example],
    make_cache: Callable[[], Any],
    *,
    chunk: int,
    max_new_tokens: int = 32,
) -> list[ExampleResult]:
    """Score each example with a fresh cache from `make_cache()`."""
    results = []
    for example in examples:
        cache = make_cache()
        prompt_ids = token_ids(tokenizer, example.prompt)
        if example.metric == "logprob":
            answer_ids = token_ids(tokenizer, example.answer)
            score = math.exp(answer_logprob(model, cache, prompt_ids, answer_ids, chunk))
            fraction = kept_fraction(cache)
        else:
            prediction = generate_answer(model, tokenizer, cache, prompt_ids, chunk, max_new_tokens)
            fraction = kept_fraction(cache)
            score = max(METRICS[example.metric](prediction, truth) for truth in example.answers or [example.answer])
        results.append(ExampleResult(score=score, kept_fraction=fraction))
    return results


def normalized_task_scores(member: list[ExampleResult], full: list[ExampleResult], examples: list[Example]) -> dict[str, float]:
    """Per task: mean member score / mean full-cache score on the same examples (the paper's normalisation)."""
    scores: dict[str, float] = {}
    for task in dict.fromkeys(example.task for example in examples):
        idx = [i for i, example in enumerate(examples) if example.task == task]
        mine = sum(member[i].score for i in idx) / len(idx)
        reference = sum(full[i].score for i in idx) / len(idx)
        scores[task] = mine / reference if reference > 0 else 0.0
    return scores
