"""lm-eval integration: the `namm` model equals stock `hf` when it keeps everything, differs when it evicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from namm_cache.lm_eval_model import NAMMLM

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = " ".join(f"word{i % 37}" for i in range(150))


def requests(kind: str):
    if kind == "loglikelihood":
        pairs = [(CONTEXT, " word5 word6"), (CONTEXT[:300], " word1"), ("Short context", " and more")]
        return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    if kind == "loglikelihood_rolling":
        return [Instance("loglikelihood_rolling", {}, (CONTEXT,), 0)]
    return [Instance("generate_until", {}, (CONTEXT, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), i)
            for i in range(2)]


def make(model_dir, cls=NAMMLM, **kwargs):
    return cls(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=kwargs.pop("batch_size", 1), **kwargs)


def test_keep_all_namm_matches_stock_hf(tiny_model_dir):
    hf = make(tiny_model_dir, HFLM)
    namm = make(tiny_model_dir, scorer="namm-cache/keep-all", update_interval=32, prefill_chunk_size=32)
    for (a, _), (b, _) in zip(hf.loglikelihood(requests("loglikelihood")), namm.loglikelihood(requests("loglikelihood"))):
        assert abs(a - b) <= 1e-4
    (a,), (b,) = hf.loglikelihood_rolling(requests("loglikelihood_rolling")), namm.loglikelihood_rolling(requests("loglikelihood_rolling"))
    assert abs(a - b) <= 1e-4
    assert hf.generate_until(requests("generate_until")) == namm.generate_until(requests("generate_until"))
    assert namm.cache_counters["caches"] > 0 and namm.cache_counters["evicted_tokens"] == 0
    assert namm.mean_kept_fraction == 1.0


def test_eviction_changes_scores_and_is_counted(tiny_model_dir):
    keep_all = make(tiny_model_dir, scorer="namm-cache/keep-all", update_interval=16, prefill_chunk_size=16)
    evicting = make(tiny_model_dir, policy="h2o", budget=24, update_interval=16, prefill_chunk_size=16)
    full = [ll for ll, _ in keep_all.loglikelihood(requests("loglikelihood"))]
    evicted = [ll for ll, _ in evicting.loglikelihood(requests("loglikelihood"))]
    assert evicting.cache_counters["evicted_tokens"] > 0
    # Three requests: ~150 and ~75 word contexts are cut to <= 24 + 16 tokens; the short one keeps all.
    assert 1 / 3 < evicting.mean_kept_fraction < 0.8 and keep_all.mean_kept_fraction == 1.0
    assert abs(full[0] - evicted[0]) > 1e-3
    assert abs(full[2] - evicted[2]) <= 1e-4  # a short context never reaches an eviction point


def test_batches_match_single_requests_with_eviction(tiny_model_dir):
    single = make(tiny_model_dir, policy="snapkv", budget=0.5, update_interval=16, prefill_chunk_size=16)
    batched = make(tiny_model_dir, policy="snapkv", budget=0.5, update_interval=16, prefill_chunk_size=16, batch_size=3)
    for (a, _), (b, _) in zip(single.loglikelihood(requests("loglikelihood")), batched.loglikelihood(requests("loglikelihood"))):
        assert abs(a - b) <= 1e-4
    assert single.generate_until(requests("generate_until")) == batched.generate_until(requests("generate_until"))


def test_bad_model_args_fail_clearly(tiny_model_dir):
    with pytest.raises(ValueError, match="no calibrated score threshold"):
        make(tiny_model_dir, policy="tova")
    with pytest.raises(ValueError, match="scorer= applies to policy=namm only"):
        make(tiny_model_dir, policy="h2o", budget=8, scorer="namm-cache/keep-all")
    # Every-layer key norms refuse left-padded generation batches: refused when the model is built, not mid-run.
    with pytest.raises(ValueError, match="run it with batch_size=1 \\(got 2\\)"):
        make(tiny_model_dir, policy="pooled_key_norm", budget=0.5, batch_size=2)
    assert make(tiny_model_dir, policy="pooled_key_norm", budget=0.5).batch_size == 1


RULER_TASKS = ["namm_ruler_niah_single_1", "namm_ruler_niah_multikey_2", "namm_ruler_niah_multikey_3",
               "namm_ruler_vt", "namm_ruler_cwe", "namm_ruler_fwe"]


def test_namm_lm_eval_runs_pack_and_ruler_tasks_offline(tmp_path, tiny_model_dir):
    # One invocation for all tasks: lm-eval's task indexing dominates the cost.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "results"
    metadata = {"tokens": 200, "samples": 2, "max_seq_lengths": [1024]}
    command = [sys.executable, "-m", "namm_cache.lm_eval_cli", "run", "--model", "namm",
               "--model_args", f"pretrained={tiny_model_dir},policy=streaming_llm,budget=64,update_interval=32",
               "--tasks", ",".join(["namm_passkey", *RULER_TASKS]), "--limit", "1", "--metadata", json.dumps(metadata),
               "--output_path", str(out), "--device", "cpu", "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert files, result.stdout[-2000:]
    data = json.loads(files[0].read_text())
    assert "exact_match,none" in data["results"]["namm_passkey"]
    assert data["config"]["model"] == "namm"
    for task in RULER_TASKS:
        scores = data["results"][task]
        assert 0.0 <= scores["string_match,none"] <= 1.0
        assert scores["1024,none"] == scores["string_match,none"] and scores["2048,none"] == -1
        (samples_file,) = out.rglob(f"samples_{task}_*.jsonl")
        sample = json.loads(samples_file.read_text().splitlines()[0])
        assert sample["doc"]["max_length"] == 1024 and sample["doc"]["outputs"]
        prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        assert prompt.endswith(sample["doc"]["gen_prefix"])  # RULER's answer prefix is where generation starts


def test_offline_model_names_become_folders_for_lm_eval():
    from namm_cache.lm_eval_cli import resolve_offline_names
    from namm_cache.offline import converted_path

    argv = ["run", "--model_args", "pretrained=smollm2-135m-instruct,policy=h2o,budget=0.25", "--tasks", "x"]
    resolved = resolve_offline_names(argv)
    assert resolved[2] == f"pretrained={converted_path('smollm2-135m-instruct')},policy=h2o,budget=0.25"
    assert resolved[:2] == argv[:2] and resolved[3:] == argv[3:]


def test_namm_lm_eval_without_arguments_prints_its_own_usage(capsys):
    from namm_cache.lm_eval_cli import main
    from namm_cache.lm_eval_model import NAMM_ARGS

    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: namm-lm-eval run --model namm") and all(arg in out for arg in NAMM_ARGS)


def test_longbench_pack_task_reads_local_jsonl_and_scores_with_the_official_metric(tmp_path):
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "src" / "namm_cache" / "lm_eval_tasks"))
    import namm_pack

    data = tmp_path / "records.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"context": "Paris is the capital of France.", "input": "Capital of France?", "answers": ["Paris"]},
        {"context": "The sky is blue.", "input": "What colour is the sky?", "answers": ["blue", "Blue sky"]},
    ]) + "\n")
    dataset = namm_pack.longbench(path=str(data), dataset="hotpotqa")["test"]
    assert len(dataset) == 2 and dataset[0]["metric"] == "qa_f1"
    assert dataset[0]["prompt"].endswith("Question: Capital of France?\nAnswer:")
    assert namm_pack.longbench_score(dataset[1], ["Blue."])["score"] == 1.0
    assert namm_pack.longbench_score(dataset[1], ["It is blue."])["score"] == 0.5  # token F1: 1 of 3 predicted tokens
    assert namm_pack.longbench_score(dataset[0], ["London"])["score"] == 0.0
    with pytest.raises(ValueError, match="needs the data file"):
        namm_pack.longbench()


def test_protected_tokens_come_through_model_args():
    from namm_cache.lm_eval_model import check_namm_args

    args = check_namm_args({"scorer": "namm-cache/keep-all", "sinks": 4, "recent_window": 64})
    assert (args.spec.config.sinks, args.spec.config.recent_window) == (4, 64)
    assert check_namm_args({"policy": "h2o", "budget": 0.25, "neighbours": 4}).spec.namm_config().neighbours == 4
    with pytest.raises(ValueError, match="neighbours must be an integer"):
        check_namm_args({"scorer": "namm-cache/keep-all", "neighbours": -2})
    assert check_namm_args({"scorer": "namm-cache/keep-all", "smoothing": 8}).spec.namm_config().smoothing == 8
    with pytest.raises(ValueError, match="recent_window"):
        check_namm_args({"scorer": "namm-cache/keep-all", "recent_window": -1})
    with pytest.raises(ValueError, match="Did you mean 'sinks'"):
        check_namm_args({}, other_keys={"sink": 4})
    assert check_namm_args({"scorer": "namm-cache/keep-all", "min_fraction": 0.3}).spec.config.min_fraction == 0.3
    assert check_namm_args({"budget": "threshold", "min_fraction": 0.3}).spec.namm_config().min_fraction == 0.3
    for given, message in (({"min_fraction": 0.3, "budget": 0.25}, r"model_args: min_fraction applies .* \(25% of"),
                           ({"min_fraction": 0.3, "policy": "h2o", "budget": 64}, r"min_fraction applies .* \(64 tokens\)"),
                           ({"threshold": 1.0, "budget": 0.25}, "threshold applies"),  # as the Python API: never ignored
                           ({"min_fraction": 0.3, "policy": "full"}, "'full' policy keeps every token")):
        with pytest.raises(ValueError, match=message):
            check_namm_args(given)
