"""Tasks in the package: one answer check, one held-out suite (the README's prompts), training and held-out
texts apart, JSONL scoring as documented, the README's "new task" recipe, and what the wheel installs."""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import tomllib
from pathlib import Path

import pytest

from namm_cache.tasks import (HELDOUT_SEED, HELDOUT_TASKS, HELDOUT_TEXT, TASKS, TRAINING_TEXT, Example, JsonlTask, build_task,
                              heldout_examples, is_correct, passkey_prompt)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from namm_cache.offline import ensure_converted

    return AutoTokenizer.from_pretrained(ensure_converted())


def fingerprint(texts) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


@pytest.mark.parametrize("completion, answer, expected", [
    (" 12345", "12345", True),
    (" 12345. Remember it.", " 12345", True),
    (" **12345**", "12345", True),
    ("12345\n", "12345", True),
    ("123456", "12345", False),  # a longer number is not the answer
    (" 1234", "12345", False),
    (" 54321 or 12345", "12345", False),  # the answer must come first
    (" Frances", "France", False),
    (" france.", "France", True),
])
def test_one_answer_check(completion, answer, expected):
    assert is_correct(completion, answer) is expected


def test_every_consumer_uses_the_one_answer_check():
    sys.path.insert(0, str(ROOT / "src" / "namm_cache" / "lm_eval_tasks"))
    import namm_pack

    assert not Example("prompt", " 12345", "passkey").is_correct("123456")
    assert not passkey_prompt(_WordTokenizer(), 60, passkey="12345").is_answered("123456")
    assert namm_pack.exact_answer({"answer": "12345"}, ["123456"]) == {"exact_match": 0.0}
    assert namm_pack.exact_answer({"answer": "12345"}, [" 12345"]) == {"exact_match": 1.0}
    with pytest.raises(ValueError, match="empty"):
        is_correct("12345", " ")


def test_the_heldout_suite_is_the_one_the_readme_tables_were_measured_on(tokenizer):
    # Pinned to the prompts evolution/evaluate.py drew before the suite moved into the package (seed 987654321,
    # KJV Proverbs): the README's held-out tables stay reproducible.
    assert HELDOUT_SEED == 987_654_321
    examples = heldout_examples(tokenizer, 5)
    assert [e.task for e in examples] == [t for t in ("passkey", "needle", "variable_tracking", "long_text") for _ in range(5)]
    assert fingerprint(e.prompt + "\x01" + e.answer for e in examples) == "24d23d7eafb73ee6"
    # The demo's and the SmolLM2 tests' pass-key prompts render as they did before, too.
    prompts = [passkey_prompt(tokenizer, 1200, depth=0.5, seed=3), passkey_prompt(tokenizer, 1500, depth=0.8, seed=8)]
    assert fingerprint(p.text + p.passkey for p in prompts) == "6a98b38be1cadd4f"


def test_a_pass_key_prompt_too_short_for_its_question_is_refused(tokenizer):
    shortest = len(tokenizer(passkey_prompt(tokenizer, 400, seed=1).text, add_special_tokens=False)["input_ids"])
    assert shortest <= 400
    for bad, message in ((10, "too short for a pass-key prompt"), (0, "n_tokens"), (-5, "n_tokens"), (2.5, "n_tokens")):
        with pytest.raises(ValueError, match=message):
            passkey_prompt(tokenizer, bad)


def test_training_and_heldout_texts_stay_apart(tiny_model_dir):
    from namm_cache.evolution import EvolutionConfig

    assert {t.get("haystack", t.get("text")) for t in HELDOUT_TASKS} == {HELDOUT_TEXT}
    with pytest.raises(ValueError, match="training text"):
        heldout_examples(_WordTokenizer(), 1, tasks=[{"name": "passkey", "tokens": 50, "haystack": TRAINING_TEXT}])
    with pytest.raises(ValueError, match="training text"):  # long_text reads the training text unless told otherwise
        heldout_examples(_WordTokenizer(), 1, tasks=[{"name": "long_text", "tokens": 50}])
    shipped = EvolutionConfig.load(ROOT / "evolution" / "configs" / "smollm2.yaml")
    assert all(build_task(t).source != HELDOUT_TEXT for s in range(len(shipped.stages)) for t in shipped.all_tasks(s))
    leak = {"model": str(tiny_model_dir), "scorer": {"kind": "mlp", "hidden_dim": 4},
            "stages": [{"tasks": [{"name": "needle", "tokens": 100, "haystack": HELDOUT_TEXT}], "generations": 1}]}
    with pytest.raises(ValueError, match=r"stages\[0\]\.tasks\[0\]: 'kjv_proverbs' is the held-out text"):
        EvolutionConfig.from_dict(leak)


def test_jsonl_task_scores_by_answer_probability_unless_told_to_generate(tmp_path, tiny_model_dir, monkeypatch):
    """`score="logprob"` (the documented default) is the teacher-forced path; it used to be ignored."""
    import math

    from namm_cache import NAMMCache
    from namm_cache.evolution import fitness
    from namm_cache.evolution.run import load_model
    from namm_cache.tasks import token_ids

    data = tmp_path / "hotpotqa.jsonl"
    data.write_text(json.dumps({"context": "Paris is in France. " * 20, "input": "Where is Paris?", "answers": ["France"]}) + "\n")
    model, tokenizer = load_model(str(tiny_model_dir))
    make_cache = lambda: NAMMCache(model=model, policy="full")  # noqa: E731
    generated = []
    real_generate = fitness.generate_answer
    monkeypatch.setattr(fitness, "generate_answer", lambda *args, **kwargs: generated.append(1) or real_generate(*args, **kwargs))

    (example,) = JsonlTask(str(data)).sample(tokenizer, random.Random(0), 1)
    (result,) = fitness.evaluate_examples(model, tokenizer, [example], make_cache, chunk=32)
    assert example.metric == "logprob" and not generated
    expected = math.exp(fitness.answer_logprob(model, make_cache(), token_ids(tokenizer, example.prompt),
                                               token_ids(tokenizer, example.answer), 32))
    assert result.score == pytest.approx(expected)

    (example,) = JsonlTask(str(data), score="generate").sample(tokenizer, random.Random(0), 1)
    fitness.evaluate_examples(model, tokenizer, [example], make_cache, chunk=32, max_new_tokens=2)
    assert example.metric == "qa_f1" and generated


def test_the_readme_recipe_for_a_new_task_works():
    readme = (ROOT / "README.md").read_text()
    section = re.split(r"\n#{2,3} ", readme.split("### A new task", 1)[1], maxsplit=1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    try:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
        names = [name for name in TASKS if name not in BUILT_IN]
        assert len(names) == 1
        task = build_task({"name": names[0], "tokens": 80, "haystack": TRAINING_TEXT})
        (example,) = task.sample(_WordTokenizer(), random.Random(0), 1)
        assert example.task == names[0] and example.prompt and example.answer.strip()
        assert example.is_correct(example.answer)
    finally:
        for name in [name for name in TASKS if name not in BUILT_IN]:
            del TASKS[name]


BUILT_IN = {"passkey", "needle", "needle_multikey", "variable_tracking", "long_text", "jsonl"}


def test_the_wheel_installs_evolution_inside_namm_cache():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    packages = set(setuptools["packages"])
    on_disk = {".".join(path.parent.relative_to(ROOT / "src").parts) for path in (ROOT / "src" / "namm_cache").rglob("__init__.py")}
    missing = on_disk - packages
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert packages - on_disk == {"namm_cache.evolution"}
    assert setuptools["package-dir"]["namm_cache.evolution"] == "evolution"
    assert not any(name == "evolution" or name.startswith("evolution.") for name in packages)
    assert project["project"]["scripts"]["namm-evolve"] == "namm_cache.evolution.cli:main"
    import namm_cache.evolution

    assert Path(namm_cache.evolution.__file__).resolve() == ROOT / "evolution" / "__init__.py"


class _WordTokenizer:
    """One token per whitespace-separated word; no chat template."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}

    def decode(self, ids):
        return " ".join("word" for _ in ids)
