"""RULER's offline tasks (niah_single_1, niah_multikey_2/3, vt, cwe, fwe) sized with the evaluated model's tokenizer.

The samples come from lm-eval's own RULER generators (`lm_eval.tasks.ruler`), so the prompts, needles and
answers are RULER's; this module only

- resolves the tokenizer the namm-cache way (offline model names such as ``smollm2-135m-instruct`` map to
  their converted folders; ``pretrained`` / ``tokenizer`` from the model args or ``--metadata`` otherwise),
- makes the sample count configurable (``samples``, default 20: CPU-sized; RULER builds 500 per length),
- seeds Python's and NumPy's RNGs per (task, length) and restores them afterwards, so two runs (and two
  policies) see identical prompts, and
- reports RULER's ``string_match_all`` overall and per length.

Lengths come from ``max_seq_lengths`` (default ``[1024]``); each must be one of `LENGTHS`. Scores per
length that were not run read -1 (lm-eval's RULER convention); ``string_match`` averages every sample.
These generators need ``wonderwords`` and ``nltk`` (``pip install "namm-cache[ruler]"``); the haystacks used
here ("repeat" and "needle") need no download and no nltk data.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import random
import zlib
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np

from namm_cache.lm_eval_tasks.namm_pack import load_tokenizer

# Seeds RULER's own generators (not the held-out suite of `namm_cache.tasks`); the README's RULER table was
# measured with it.
RULER_SEED = 20_241_126
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_LENGTHS = (1024,)


def _ruler(module: str):
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the generators print progress chatter on import
            return importlib.import_module(f"lm_eval.tasks.ruler.{module}")
    except ImportError as error:  # wonderwords / nltk missing
        raise ImportError(
            f"The namm_ruler tasks use lm-eval's RULER generators, which need `wonderwords` and `nltk`: "
            f'pip install "namm-cache[ruler]" ({error})'
        ) from error


def _lengths(kwargs: dict[str, Any]) -> list[int]:
    raw = kwargs.get("max_seq_lengths", DEFAULT_LENGTHS)
    if isinstance(raw, (int, str)):
        raw = [raw]
    lengths = [int(x) for x in raw]
    bad = [n for n in lengths if n not in LENGTHS]
    if not lengths or bad:
        raise ValueError(f"max_seq_lengths must be a non-empty list drawn from {list(LENGTHS)}, got {list(raw)}.")
    return lengths


def _samples(kwargs: dict[str, Any]) -> int:
    samples = int(kwargs.get("samples", 20))
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}.")
    return samples


def _seeded(task: str, length: int, build: Callable[[], list[dict]], module_rng: random.Random | None = None) -> list[dict]:
    """Run a RULER generator under a fixed seed without leaving the global RNGs (or the module's own) changed."""
    rngs = [random] + ([module_rng] if module_rng is not None else [])
    states, numpy_state = [rng.getstate() for rng in rngs], np.random.get_state()
    seed = (RULER_SEED + zlib.crc32(task.encode()) + length) % 2**32
    for offset, rng in enumerate(rngs):
        rng.seed(seed + offset)
    np.random.seed(seed)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # RULER's vt generator prints every sizing step
            return build()
    finally:
        for rng, state in zip(rngs, states):
            rng.setstate(state)
        np.random.set_state(numpy_state)


def _dataset(task: str, kwargs: dict[str, Any], make: Callable[[Any, int, int], list[dict]],
             module_rng: random.Random | None = None) -> dict[str, datasets.Dataset]:
    lengths, samples = _lengths(kwargs), _samples(kwargs)
    tokenizer = load_tokenizer(kwargs)
    rows = itertools.chain.from_iterable(
        _seeded(task, n, lambda n=n: make(tokenizer, n, samples), module_rng) for n in lengths)
    keep = ("input", "outputs", "gen_prefix", "max_length", "length")
    return {"test": datasets.Dataset.from_list([{k: row[k] for k in keep} for row in rows])}


def _niah(task: str, haystack: str, needle_k: str, needle_v: str, kwargs: dict[str, Any]):
    prepare, niah = _ruler("prepare_niah"), _ruler("niah_utils")

    def make(tokenizer, length: int, samples: int) -> list[dict]:
        return prepare.generate_samples(
            prepare.get_haystack(type_haystack=haystack), TOKENIZER=tokenizer, max_seq_length=length,
            type_haystack=haystack, type_needle_k=needle_k, type_needle_v=needle_v, template=niah.TEMPLATE,
            num_samples=samples,
        )

    return _dataset(task, kwargs, make)


def niah_single_1(**kwargs: Any):
    """One number needle in a repeated filler haystack."""
    return _niah("niah_single_1", "repeat", "words", "numbers", kwargs)


def niah_multikey_2(**kwargs: Any):
    """One number needle among needle-shaped distractors."""
    return _niah("niah_multikey_2", "needle", "words", "numbers", kwargs)


def niah_multikey_3(**kwargs: Any):
    """One UUID needle keyed by a UUID among needle-shaped distractors."""
    return _niah("niah_multikey_3", "needle", "uuids", "uuids", kwargs)


def vt(**kwargs: Any):
    """Variable tracking: a 4-hop chain of assignments among noise, with one in-context example."""
    module = _ruler("vt_utils")

    def make(tokenizer, length: int, samples: int) -> list[dict]:
        example = module.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=1, max_seq_length=500, incremental=5)[0]
        return module.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=samples, max_seq_length=length,
                                                  icl_example=example)

    return _dataset("ruler_vt", kwargs, make)


def cwe(**kwargs: Any):
    """Common words extraction: list the ten most frequent words."""
    module = _ruler("cwe_utils")
    return _dataset("ruler_cwe", kwargs, lambda tok, n, s: module.sys_word_pair_random(num_samples=s, max_seq_length=n, tokenizer=tok),
                    module_rng=module.RNG)  # cwe shuffles with its own module-level Random


def fwe(**kwargs: Any):
    """Frequent words extraction: the three most frequent coded words of a Zipf-distributed text."""
    module = _ruler("fwe_utils")
    return _dataset("ruler_fwe", kwargs, lambda tok, n, s: module.sys_kwext(tokenizer=tok, max_seq_length=n, num_samples=s))


def score(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """RULER's string_match_all (fraction of reference strings found in the completion), overall and per length."""
    common = _ruler("common_utils")
    value = common.string_match_all(common.postprocess_pred(results), [doc["outputs"]])
    metrics = {str(n): -1.0 for n in LENGTHS}
    metrics[str(doc["max_length"])] = value
    metrics["string_match"] = value
    return metrics


def aggregate(values: list[float]) -> float:
    """Mean over the samples of one length; -1 when that length was not run (RULER's own aggregation)."""
    return float(_ruler("common_utils").aggregate_metrics(values))
