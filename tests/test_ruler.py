"""The pack's RULER tasks: RULER's own generators, sized by our tokenizer, reproducible, scored per length."""

from __future__ import annotations

import random

import numpy as np
import pytest
from transformers import AutoTokenizer

from namm_cache.lm_eval_tasks import namm_ruler
from namm_cache.offline import ensure_converted

TASKS = ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe"]


@pytest.fixture(scope="module")
def tokenizer_dir():
    return str(ensure_converted())


@pytest.mark.parametrize("task", TASKS)
def test_samples_fit_the_length_and_hold_their_answers(task, tokenizer_dir):
    rows = getattr(namm_ruler, task)(pretrained=tokenizer_dir, samples=3, max_seq_lengths=[1024])["test"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(rows) == 3
    for row in rows:
        assert row["max_length"] == 1024
        prompt_tokens = len(tokenizer(row["input"]).input_ids)
        # RULER sizes prompt + answer room to the target; fwe counts only its text, so allow its small overshoot.
        assert 500 < prompt_tokens <= 1024 + (64 if task == "fwe" else 0), prompt_tokens
        assert row["outputs"] and all(isinstance(answer, str) and answer for answer in row["outputs"])
        if task.startswith("niah") or task == "vt":
            assert all(answer in row["input"] for answer in row["outputs"])
        if task == "vt":
            assert str(len(row["outputs"])) in row["gen_prefix"]  # "... 5 variables are assigned ..."


def test_datasets_are_reproducible_and_leave_global_rngs_alone(tokenizer_dir):
    random.seed(7)
    np.random.seed(7)
    expected_python, expected_numpy = random.random(), np.random.rand()
    random.seed(7)
    np.random.seed(7)
    first = namm_ruler.cwe(pretrained=tokenizer_dir, samples=2)["test"]
    assert (random.random(), np.random.rand()) == (expected_python, expected_numpy)
    second = namm_ruler.cwe(pretrained=tokenizer_dir, samples=2)["test"]
    assert first["input"] == second["input"] and first["outputs"] == second["outputs"]
    other_task = namm_ruler.fwe(pretrained=tokenizer_dir, samples=2)["test"]
    assert other_task["input"] != first["input"]


def test_several_lengths_and_per_length_scores(tokenizer_dir):
    rows = namm_ruler.niah_single_1(pretrained=tokenizer_dir, samples=2, max_seq_lengths=[1024, 2048])["test"]
    assert rows["max_length"] == [1024, 1024, 2048, 2048]
    short, long = rows[0], rows[2]
    right = namm_ruler.score(short, [f" {short['outputs'][0]}."])
    wrong = namm_ruler.score(long, ["I do not know."])
    assert right["string_match"] == 1.0 and right["1024"] == 1.0 and right["2048"] == -1.0
    assert wrong["string_match"] == 0.0 and wrong["2048"] == 0.0 and wrong["1024"] == -1.0
    assert namm_ruler.aggregate([right["1024"], wrong["1024"]]) == 1.0  # -1 = not run at this length
    assert namm_ruler.aggregate([-1.0, -1.0]) == -1.0
    # Partial credit: RULER's string_match_all counts each reference found.
    multi = {"outputs": ["alpha", "beta"], "max_length": 4096}
    assert namm_ruler.score(multi, ["Alpha and gamma"])["4096"] == 0.5


def test_bad_sizes_are_refused(tokenizer_dir):
    with pytest.raises(ValueError, match="max_seq_lengths"):
        namm_ruler.niah_single_1(pretrained=tokenizer_dir, max_seq_lengths=[1000])
    with pytest.raises(ValueError, match="max_seq_lengths"):
        namm_ruler.vt(pretrained=tokenizer_dir, max_seq_lengths=[])
    with pytest.raises(ValueError, match="samples"):
        namm_ruler.cwe(pretrained=tokenizer_dir, samples=0)
