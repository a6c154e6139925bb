"""Fuzz every public constructor and CLI with random and hostile values (issue 12).

The rule for each call: either it refuses with one clear `ValueError` (a one-line message; the CLIs exit 2
with one `error:` line and no traceback), or it accepts the value and then behaves correctly (canonical,
finite settings; a cache that runs). Any other exception fails the test: that would be a deep traceback.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_ids, tiny_model

from namm_cache import BAMScorer, MLPScorer, NAMMCache, NAMMConfig
from namm_cache.budgets import FractionBudget, ThresholdBudget, TokenBudget, parse_budget
from namm_cache.hub import ScorerLoadError, bundled_root, load_folder

HOSTILE = [float("nan"), float("inf"), -float("inf"), -1, 0, 2.7, "abc", "no", "yes", "", None, [], {}, 10**12,
           np.int64(7), np.float32(0.5), True, False, 1e308, -0.0, "16", 16.0, 2**70, object()]
# Values that are also fine somewhere, so the fuzz reaches the accepting paths too.
FRIENDLY = {"n_fft": [32, 16], "hop_length": [16, 8], "ema_gamma": [0.99, 1.0], "recency_dim": [8, 0, 4],
            "recency_max_frequency": [50000.0, 10], "update_interval": [16, 32, np.int64(16)],
            "threshold": [0.0, -1.5, None], "max_tokens": [None, 8, np.int32(4)]}
FIELDS = list(FRIENDLY)


REFUSED = object()


def one_line_value_error(call):
    """Run `call`; return its result, or REFUSED if it raised a one-line ValueError (anything else fails)."""
    try:
        return call()
    except ValueError as error:
        assert str(error) and "\n" not in str(error), repr(error)
        return REFUSED


def assert_canonical(config: NAMMConfig) -> None:
    for name in ("n_fft", "hop_length", "recency_dim", "update_interval"):
        assert type(getattr(config, name)) is int and getattr(config, name) >= 0
    for name in ("ema_gamma", "recency_max_frequency"):
        assert type(getattr(config, name)) is float and math.isfinite(getattr(config, name))
    assert config.threshold is None or (type(config.threshold) is float and math.isfinite(config.threshold))
    assert config.max_tokens is None or (type(config.max_tokens) is int and config.max_tokens >= 1)
    assert config.n_fft == 2 * config.hop_length and config.update_interval % config.hop_length == 0
    assert 0 < config.ema_gamma <= 1 and config.recency_max_frequency > 0
    json.dumps(config.to_dict(), allow_nan=False)


def test_namm_config_every_field_with_every_hostile_value():
    for name in FIELDS:
        for value in HOSTILE + FRIENDLY[name]:
            config = one_line_value_error(lambda: NAMMConfig(**{name: value}))
            if config is not REFUSED:
                assert_canonical(config)


def test_namm_config_random_combinations():
    rng = random.Random(12)
    accepted = 0
    for _ in range(400):
        fields = {name: rng.choice(HOSTILE + FRIENDLY[name] * 4) for name in rng.sample(FIELDS, rng.randint(1, len(FIELDS)))}
        config = one_line_value_error(lambda: NAMMConfig(**fields))
        if config is not REFUSED:
            accepted += 1
            assert_canonical(config)
            assert NAMMConfig.from_dict(config.to_dict()) == config
    assert accepted > 10  # the fuzz reached the accepting path


def test_parse_budget_hostile_values():
    for value in HOSTILE + ["25%", "0.5", "512", "threshold", "1", 1, "1.0", "-5", "5 tokens", "%", "nan%", 0.3]:
        budget = one_line_value_error(lambda: parse_budget(value))
        if isinstance(budget, TokenBudget):
            assert type(budget.tokens) is int and budget.tokens >= 2
        elif isinstance(budget, FractionBudget):
            assert type(budget.fraction) is float and 0 < budget.fraction <= 1
        else:
            assert budget is REFUSED or isinstance(budget, ThresholdBudget) or (budget is None and value is None)


@pytest.mark.parametrize("scorer_class", [BAMScorer, MLPScorer])
def test_scorer_constructors(scorer_class):
    for name in ("input_dim", "hidden_dim", "n_bins"):
        for value in HOSTILE + [1, 25, 4096, 4097]:
            scorer = one_line_value_error(lambda: scorer_class(**{name: value}))
            if scorer is not REFUSED:
                assert type(scorer.input_dim) is int and type(scorer.n_bins) is int and scorer.input_dim >= scorer.n_bins >= 1
                assert float(scorer.get_flat_params().abs().sum()) == 0.0  # zero-initialised: keeps everything


def test_namm_cache_keyword_arguments_and_a_forward_when_accepted():
    model = tiny_model("llama", num_hidden_layers=2)
    rng = random.Random(5)
    policies = ["namm", "h2o", "tova", "full", "random", "snapkv", "streaming_llm"] * 3 + ["bogus", "", 3, None, []]
    budgets = HOSTILE + [None, "25%", 8, 0.5, "threshold", 1] * 6
    ran = 0
    for _ in range(80):
        kwargs = {"update_interval": 16, "policy": rng.choice(policies), "budget": rng.choice(budgets)}
        field = rng.choice(FIELDS)
        kwargs[field] = rng.choice(HOSTILE + FRIENDLY[field] * 3)
        if rng.random() < 0.3:
            kwargs["policy_kwargs"] = rng.choice([{"seed": rng.choice(HOSTILE)}, {"sinks": rng.choice(HOSTILE)},
                                                  {"recent_ratio": rng.choice(HOSTILE)}, {"window": rng.choice(HOSTILE)},
                                                  "abc", []])
        cache = one_line_value_error(lambda: NAMMCache(model=model, **kwargs))
        if cache is not REFUSED and ran < 8:
            ran += 1
            with torch.no_grad():
                for chunk in random_ids(48).split(16, dim=1):
                    logits = model(input_ids=chunk, cache=cache).logits
            assert torch.isfinite(logits).all() and cache.get_seq_length() == 48
    for bad in ("abc", 3, {"update_interval": 16}, [], np.float64(1.0)):
        assert one_line_value_error(lambda: NAMMCache(model=model, config=bad)) is REFUSED
        assert one_line_value_error(lambda: NAMMCache(model=model, scorer=bad)) is REFUSED
    assert one_line_value_error(lambda: NAMMCache(model="a model")) is REFUSED
    assert ran >= 3


# --------------------------------------------------------------------------------------- crafted folders
KEEP_ALL = bundled_root() / "namm-cache" / "keep-all"
JSON_HOSTILE = [float("nan"), float("inf"), -1, 0, 2.7, "abc", "no", None, [], {}, 10**12, True, 1e308,
                {"a": {"b": [1]}}, [[[[1]]]]]
PATHS = ["format_version", "scorer", "scorer.kind", "scorer.input_dim", "scorer.hidden_dim", "scorer.n_bins",
         *(f"namm_config.{name}" for name in FIELDS), "namm_config", "normalization", "normalization.shape",
         "fitness", "base_models", "training_tasks", "results", "extra", "license", "description", "library_name"]


def crafted(folder: Path, path: str, value) -> Path:
    payload = json.loads((KEEP_ALL / "config.json").read_text())
    target = payload
    *parents, last = path.split(".")
    for part in parents:
        target = target[part]
    target[last] = value
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(KEEP_ALL / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(payload))
    return folder


def test_load_folder_on_crafted_config_files(tmp_path):
    features = torch.randn(2, 5, 25)
    for path in PATHS:
        for value in JSON_HOSTILE:
            folder = crafted(tmp_path / "s", path, value)
            try:
                loaded = load_folder(folder)
            except ScorerLoadError as error:
                assert "\n" not in str(error) and str(folder) in str(error), (path, value, str(error))
                continue
            assert_canonical(loaded.config)  # accepted: then everything in it is sane
            meta = loaded.metadata
            assert meta.fitness is None or math.isfinite(meta.fitness)
            scores = loaded.scorer(features, torch.arange(5).expand(2, 5), torch.ones(2, 5, dtype=torch.bool))
            assert torch.isfinite(scores).all()


def test_load_folder_on_random_bytes_and_truncated_weights(tmp_path):
    rng = random.Random(3)
    for trial in range(20):
        folder = crafted(tmp_path / f"r{trial}", "license", "mit")
        if trial % 2:
            (folder / "config.json").write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))))
        else:
            data = (folder / "model.safetensors").read_bytes()
            cut = rng.randint(0, len(data) - 1)
            (folder / "model.safetensors").write_bytes(data[:cut] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))))
        with pytest.raises(ScorerLoadError) as error:
            load_folder(folder)
        assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------- CLIs
def assert_cli_refused(code, capsys) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.strip(), err
    assert "error:" in err.strip().splitlines()[-1]


def test_namm_cache_cli_on_hostile_arguments(tmp_path, capsys):
    from namm_cache.cli import main

    cases = [["info", str(crafted(tmp_path / "a", "fitness", "0.9"))],
             ["info", str(crafted(tmp_path / "b", "namm_config.threshold", float("nan")))],
             ["info", str(crafted(tmp_path / "c", "scorer.hidden_dim", 20_000_000))],
             ["info", str(tmp_path / "missing")], ["info", "nobody/nothing"], ["info", "namm-cache/keep-all", "--revision", "v2"],
             ["info", "namm-cache/keep-all", "--revision", ""], ["push", str(tmp_path / "missing"), "acme/x"], ["info"], [],
             ["bogus"], ["info", str(tmp_path / "b"), "--revision", "main"]]
    for argv in cases:
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's own usage errors
            code = exit.code
        assert_cli_refused(code, capsys)
    assert main(["info", "namm-cache/keep-all"]) == 0 and "scorer: bam" in capsys.readouterr().out


def test_namm_lm_eval_cli_on_hostile_model_args(tmp_path, capsys, monkeypatch):
    from namm_cache.lm_eval_cli import main
    from namm_cache.lm_eval_model import check_namm_args

    monkeypatch.setattr("sys.argv", ["namm-lm-eval"])
    rng = random.Random(7)
    texts = ["nan", "inf", "-1", "0", "2.7", "abc", "no", "None", "[]", "{}", "1000000000000", "true", "1", "1e400", "'16'"]
    names = ["threshold", "budget", "update_interval", "max_tokens", "prefill_chunk_size", "policy", "scorer", "treshold", "polcy"]
    refused = 0
    for _ in range(40):
        args = {rng.choice(names): rng.choice(texts) for _ in range(rng.randint(1, 3))}
        from lm_eval._cli.utils import handle_cli_value_string

        parsed = {key: handle_cli_value_string(value) for key, value in args.items()}
        namm = {key: parsed.pop(key) for key in list(parsed) if key in ("threshold", "budget", "update_interval", "max_tokens",
                                                                        "prefill_chunk_size", "policy", "scorer")}
        if one_line_value_error(lambda: check_namm_args(namm, other_keys=parsed)) is not REFUSED:
            continue  # accepted: running it would evaluate a model; acceptance is covered by test_lm_eval.py
        refused += 1
        model_args = ",".join([f"pretrained={tmp_path / 'no-model'}", *(f"{k}={v}" for k, v in args.items())])
        monkeypatch.setattr("sys.argv", ["namm-lm-eval"])
        code = main(["run", "--model", "namm", "--model_args", model_args, "--tasks", "namm_passkey", "--limit", "1"])
        assert_cli_refused(code, capsys)
    assert refused > 20
