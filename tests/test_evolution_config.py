"""Evolution configs (issue 12): every bad value is one clear error (exit status 2, one line, no traceback) given
before the run folder is created or any model is loaded, and hostile values never pass as something else."""

from __future__ import annotations

import json
import math

import pytest
from test_evolution_checkpoints import assert_one_line_error, run_cli, small_config, weightless_model_dir  # noqa: F401

from namm_cache.evolution import EvolutionConfig


# ------------------------------------------------------------------------------------ config values
BAD_CONFIG_VALUES = [
    ("memory_weight=.nan", "memory_weight must be a number in [0, inf), got nan"),
    ("separable='no'", "separable must be true or false (a bool), got the string 'no'"),
    ("stages.0.tasks.0.tokens=-100", "stages[0].tasks[0]: passkey.tokens must be an integer in [1, inf), got -100"),
    ("stages.0.generations=2.7", "stages[0].generations must be an integer in [1, inf), got 2.7"),
    ("prefill_chunk=0", "prefill_chunk must be an integer or None, in [1, inf), got 0"),
    ("stages.0.tasks.0.tokens=100000", "needs up to 100016 tokens (prompt + answer), more than the context window"),
    ("population=2.5", "population must be an integer, got 2.5"),
    ("seed=abc", "seed must be an integer in [0, 2147483647], got the string 'abc'"),
    ("sigma0=.nan", "sigma0 must be a number in (0, inf), got nan"),
    ("scorer={kind: mlp, hiden_dim: 8}", "unknown setting(s) ['hiden_dim']. Did you mean 'hidden_dim'?"),
    ("stages.0.memory_weight=-0.5", "stages[0].memory_weight must be a number or None, in [0, inf), got -0.5"),
    ("stages.0.namm={threshold: .inf}", "threshold"),
    ("namm.threshold=.nan", "threshold"),
    ("threads=0", "threads must be an integer in [1, inf), got 0"),
    ("stages=[]", "Give at least one stage"),
    ("stages.0.tasks=[]", "stages[0] must have at least one task"),
    ("scorer.kind=transformer", "scorer.kind must be one of ['bam', 'bam_norms', 'linear', 'linear_all_layers', 'linear_pooled', 'mlp']"),
    ("stages.7.generations=1", "'7' is not an index of a list of 1 item(s)"),
    ("population=[8", "is not valid YAML"),
]


@pytest.mark.parametrize("override, message", BAD_CONFIG_VALUES)
def test_bad_config_values_exit_2_with_one_line_before_any_work(tmp_path, weightless_model_dir, capsys, override, message):
    config = small_config(tmp_path / "run.yaml", weightless_model_dir)
    out = tmp_path / "out"
    assert_one_line_error(*run_cli(capsys, "--config", config, "--out", out, "--set", override), message)
    assert not out.exists()


def test_a_config_file_that_is_not_a_mapping_or_not_yaml(tmp_path, capsys):
    for text, message in (("- a\n- list\n", "must hold an object of named settings"), ("population: [8\n", "is not valid YAML")):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        assert_one_line_error(*run_cli(capsys, "--config", path, "--out", tmp_path / "out"), str(path), message)


HOSTILE = [None, True, False, "abc", "", -1, 0, 1, 2.5, float("nan"), float("inf"), -float("inf"), 1e300, 10**30,
           [], {}, [1], {"a": 1}, "1", "0.5"]


@pytest.mark.parametrize("key", ["model", "scorer", "namm", "budget", "population", "sigma0", "separable", "seed", "prompts_per_task",
                                 "prefill_chunk", "memory_weight", "calibration_prompts", "threads", "stages",
                                 "stages.0", "stages.0.tasks", "stages.0.tasks.0", "stages.0.tasks.0.tokens",
                                 "stages.0.generations", "stages.0.memory_weight", "stages.0.namm", "scorer.hidden_dim"])
def test_hostile_config_values_give_value_errors_or_valid_configs(tiny_model_dir, key):
    """Every value of every setting either builds a config whose values have the right types, or raises a
    `ValueError` / `FileNotFoundError`: never another exception, never a silently converted value."""
    from namm_cache.evolution.config import set_dotted

    base = {"model": str(tiny_model_dir), "scorer": {"kind": "mlp", "hidden_dim": 4}, "population": 4,
            "stages": [{"tasks": [{"name": "passkey", "tokens": 100}], "generations": 1}]}
    for value in HOSTILE:
        data = json.loads(json.dumps(base))
        set_dotted(data, key, value)
        try:
            config = EvolutionConfig.from_dict(data)
        except (ValueError, FileNotFoundError):
            continue
        assert type(config.population) is int and type(config.seed) is int and type(config.separable) is bool
        assert type(config.sigma0) is float and math.isfinite(config.sigma0) and config.sigma0 > 0
        assert type(config.memory_weight) is float and math.isfinite(config.memory_weight)
        assert all(type(stage.generations) is int and stage.generations >= 1 for stage in config.stages)
        assert config.prefill_chunk is None or (type(config.prefill_chunk) is int and config.prefill_chunk >= 1)
