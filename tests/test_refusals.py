"""Issue 12 (items 4-8, outside evolution): bad numbers and broken files give one clear error, never a silent
wrong result, a deep traceback or a huge allocation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import random_scorer
from safetensors.torch import save_file
from test_hub import build_hf_cache, edit_config

from namm_cache import NAMMCache, NAMMConfig
from namm_cache.budgets import FractionBudget, TokenBudget, parse_budget
from namm_cache.hub import ScorerLoadError, ScorerMetadata, bundled_root, load_folder, load_scorer, save_scorer

ROOT = Path(__file__).resolve().parent.parent
KEEP_ALL = bundled_root() / "namm-cache" / "keep-all"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def scorer_folder(tmp_path: Path, config_text: str | None = None, **changes) -> Path:
    """A copy of the bundled keep-all scorer, its config.json replaced by `config_text` or edited by `changes`."""
    folder = tmp_path / "scorer"
    folder.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((KEEP_ALL / name).read_bytes())
    if config_text is None:
        edit_config(folder, **changes)
    else:
        (folder / "config.json").write_text(config_text)
    return folder


def run_cli(*args: str, module: str = "namm_cache.cli") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, prefix: str, fragment: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix) and fragment in last, last


# ------------------------------------------------------------------------ item 4: non-finite thresholds
def test_nan_threshold_in_a_scorer_config_json_is_refused(tmp_path):
    folder = scorer_folder(tmp_path, **{"namm_config.threshold": float("nan")})
    assert "NaN" in (folder / "config.json").read_text()  # Python's json writes (and reads) the NaN literal
    with pytest.raises(ScorerLoadError, match=r"config.json 'namm_config'.*threshold must be a number or None, got nan|threshold must be a number or None, got nan"):
        load_folder(folder)


def test_save_pretrained_never_writes_a_nan_threshold(tmp_path):
    cache = NAMMCache(model=tiny_model("llama"), scorer=random_scorer(0))
    cache.namm_config.threshold = float("nan")  # a dataclass field edited after validation
    with pytest.raises(ValueError, match="threshold must be a number or None, got nan"):
        cache.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_lm_eval_model_args_are_checked_before_the_model_loads(tiny_model_dir):
    from namm_cache.lm_eval_model import NAMMLM

    # A model path that does not exist: had the model loaded first, the error would be about the path.
    for bad, message in [({"threshold": float("nan")}, "threshold must be a number or None, got nan"),
                         ({"update_interval": -16}, "update_interval must be an integer in"),
                         ({"prefill_chunk_size": 0}, "prefill_chunk_size must be an integer"),
                         ({"max_tokens": 2.7}, "not a whole number"),
                         ({"budget": 1}, "ambiguous"),
                         ({"policy": "h2oo", "budget": 8}, "Did you mean 'h2o'"),
                         ({"treshold": 0.5}, "Did you mean 'threshold'")]:
        with pytest.raises(ValueError, match=message):
            NAMMLM(pretrained=str(tiny_model_dir / "does-not-exist"), device="cpu", **bad)


# ------------------------------------------------------------------------ item 5: no silent substitution
def test_a_revision_of_a_bundled_name_is_not_answered_with_the_bundled_scorer(tmp_path):
    assert load_scorer("namm-cache/keep-all", cache_dir=tmp_path).source == "bundled scorer namm-cache/keep-all"
    with pytest.raises(ScorerLoadError, match="at revision 'v2'.*bundled scorers have no revisions"):
        load_scorer("namm-cache/keep-all", revision="v2", cache_dir=tmp_path)


def test_a_hub_cache_copy_missing_its_weights_is_an_error_not_the_bundled_scorer(tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((KEEP_ALL / "config.json").read_bytes())
    build_hf_cache(tmp_path / "hf-cache", "namm-cache/keep-all", partial)
    with pytest.raises(ScorerLoadError, match="config.json was found .* model.safetensors could not be had.*incomplete"):
        load_scorer("namm-cache/keep-all", cache_dir=tmp_path / "hf-cache")


# ------------------------------------------------------------------ item 6: sizes before allocation
def test_a_500_byte_config_asking_for_a_huge_scorer_fails_fast(tmp_path):
    folder = scorer_folder(tmp_path, **{"scorer.hidden_dim": 20_000_000})
    assert (folder / "config.json").stat().st_size < 1000
    started = time.perf_counter()
    with pytest.raises(ScorerLoadError, match="hidden_dim must be an integer in"):
        load_folder(folder)
    assert time.perf_counter() - started < 2.0


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak memory from /proc")
def test_sizes_are_checked_against_the_weights_header_before_anything_is_allocated(tmp_path):
    # Config sizes within every range, but ~420 MB of scorer, against the small keep-all weights: the header
    # shows the mismatch, so the process must not grow by the scorer's size before refusing.
    folder = scorer_folder(tmp_path, **{"scorer.hidden_dim": 4096, "scorer.input_dim": 5121, "scorer.n_bins": 4097,
                                        "namm_config.n_fft": 8192, "namm_config.hop_length": 4096,
                                        "namm_config.recency_dim": 1024, "namm_config.update_interval": 4096,
                                        "normalization.shape": [4097]})
    # Peak resident memory of a fresh process (VmHWM; ru_maxrss would inherit the parent's peak across exec).
    probe = textwrap.dedent(f"""
        from pathlib import Path
        from namm_cache.hub import ScorerLoadError, load_folder
        def peak_mb():
            line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
            return int(line.split()[1]) / 1024
        before = peak_mb()
        try:
            load_folder(Path({str(folder)!r}))
            print("LOADED")
        except ScorerLoadError as error:
            print("REFUSED", error)
        print("GREW_MB", peak_mb() - before)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=300)
    assert "REFUSED" in result.stdout and "has shape" in result.stdout, result.stdout + result.stderr[-2000:]
    grew = float(result.stdout.split("GREW_MB")[1])
    assert grew < 100, f"grew by {grew} MB before refusing"


# --------------------------------------------------------------------- item 7: clear errors, no tracebacks
@pytest.mark.parametrize("text, kind", [("[1, 2]", "got list"), ("null", "got null"), ("3", "got int"),
                                        ("[" * 100_000 + "]" * 100_000, "nested too deeply")])
def test_a_config_json_that_is_not_an_object_is_named(tmp_path, text, kind):
    folder = scorer_folder(tmp_path, text)
    with pytest.raises(ScorerLoadError, match=kind) as error:
        load_folder(folder)
    assert str(folder / "config.json") in str(error.value)


def test_unknown_scorer_settings_get_a_did_you_mean(tmp_path):
    payload = json.loads((KEEP_ALL / "config.json").read_text())
    payload["scorer"]["hiden_dim"] = payload["scorer"].pop("hidden_dim")
    folder = scorer_folder(tmp_path, json.dumps(payload))
    with pytest.raises(ScorerLoadError, match=r"unknown setting\(s\) \['hiden_dim'\]. Did you mean 'hidden_dim'"):
        load_folder(folder)
    payload["scorer"]["hidden_dim"] = payload["scorer"].pop("hiden_dim")
    payload["namm_confg"] = payload.pop("namm_config")
    folder = scorer_folder(tmp_path, json.dumps(payload))
    with pytest.raises(ScorerLoadError, match="Did you mean 'namm_config'"):
        load_folder(folder)


def test_namm_cache_info_with_a_string_fitness_exits_2_with_one_line(tmp_path):
    folder = scorer_folder(tmp_path, fitness="0.93")
    assert_one_line_error(run_cli("info", str(folder)), "namm-cache: error:", "fitness must be a number or None, got the string '0.93'")
    with pytest.raises(ValueError, match="fitness must be a number"):
        ScorerMetadata(fitness="0.93")


def test_a_cache_built_for_a_2_layer_model_used_on_a_4_layer_model(tmp_path):
    small, large = tiny_model("llama", num_hidden_layers=2), tiny_model("llama")
    NAMMCache(model=large)  # the large model's attention runs through the wrapper too
    cache = NAMMCache(model=small)
    with pytest.raises(ValueError, match="built for a model with 2 layers but was asked to update layer 2"):
        with torch.no_grad():
            large(input_ids=random_ids(8), cache=cache)


def test_namm_lm_eval_argument_errors_exit_2_without_a_traceback(tmp_path):
    result = run_cli("run", "--model", "namm", "--model_args", f"pretrained={tmp_path / 'no-model'},threshold=nan",
                     "--tasks", "namm_passkey", "--limit", "1", module="namm_cache.lm_eval_cli")
    assert_one_line_error(result, "namm-lm-eval: error:", "threshold must be a number or None, got nan")


# ------------------------------------------------------------------------------------ item 8: small ones
def test_budget_one_is_refused_as_ambiguous_in_every_form_and_full_is_spelled_out():
    for ambiguous in (1, "1", " 1 ", np.int64(1), "+1"):
        with pytest.raises(ValueError, match="ambiguous.*'100%'"):
            parse_budget(ambiguous)
    for full in ("100%", 1.0, "1.0", np.float64(1.0)):
        assert parse_budget(full) == FractionBudget(1.0)
    assert parse_budget(TokenBudget(1)) == TokenBudget(1)  # explicit, so allowed
    # The text lm-eval hands over and the Python value mean the same thing.
    from lm_eval._cli.utils import handle_cli_value_string

    for text in ("512", "0.25", "25%", "threshold", "1.0", "1e3"):
        assert parse_budget(handle_cli_value_string(text)) == parse_budget(text)


def test_numpy_budgets_are_accepted():
    assert parse_budget(np.int64(64)) == TokenBudget(64) and type(parse_budget(np.int64(64)).tokens) is int
    assert parse_budget(np.float32(0.25)) == FractionBudget(0.25)
    cache = NAMMCache(model=tiny_model("llama"), policy="h2o", budget=np.int64(24), update_interval=16)
    assert cache.budget == TokenBudget(24)


def test_building_a_cache_does_not_advance_the_global_torch_rng():
    model = tiny_model("llama")
    state = torch.random.get_rng_state()
    NAMMCache(model=model)
    NAMMCache(model=model, policy="random", budget=8)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_torch_compile_without_fullgraph_runs_the_cache_eagerly_and_matches():
    # README: fullgraph=True raises (tests/test_errors.py); the default compiles around the cache's update.
    model = tiny_model("llama", num_hidden_layers=1)

    def logits(forward):
        cache = NAMMCache(model=model, scorer=random_scorer(0), update_interval=16)
        with torch.no_grad():
            out = torch.cat([forward(input_ids=chunk, cache=cache).logits for chunk in random_ids(32).split(16, dim=1)], 1)
        return out, cache.stats()["evicted_tokens"]

    reference, evicted = logits(model)
    compiled, compiled_evicted = logits(torch.compile(model, backend="eager"))
    assert evicted > 0 and compiled_evicted == evicted
    assert torch.allclose(compiled, reference, atol=1e-5)
    assert not math.isnan(float(compiled.sum()))
