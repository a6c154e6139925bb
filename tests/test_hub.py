"""Scorer repositories: round trips, the real HF cache layout offline, push commits, bundled scorers, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from helpers import random_scorer
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.torch import load_file, save_file

from namm_cache import NAMMCache, NAMMConfig
from namm_cache.hub import (
    DEFAULT_SCORER,
    ScorerLoadError,
    ScorerMetadata,
    bundled_names,
    bundled_root,
    describe,
    load_folder,
    load_scorer,
    save_scorer,
)

METADATA = ScorerMetadata(
    base_models=["HuggingFaceTB/SmolLM2-135M-Instruct"],
    training_tasks=["passkey", "needle"],
    fitness=0.875,
    description="A test scorer.",
    results=[{"task": "passkey", "score": 0.9, "kept": 0.25}],
)


def calibrated_scorer():
    scorer = random_scorer(4)
    scorer.set_normalization(torch.rand(17), torch.rand(17) + 0.5)
    return scorer


def scores_of(scorer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 20, 25, generator=generator)
    return scorer(features, torch.arange(20).expand(3, 20), torch.ones(3, 20, dtype=torch.bool))


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    scorer = calibrated_scorer()
    config = NAMMConfig(update_interval=128, max_tokens=300)
    save_scorer(tmp_path / "s", scorer, config, METADATA, repo_id="org/s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = load_scorer(tmp_path / "s")
    assert torch.equal(scores_of(loaded.scorer), scores_of(scorer))
    assert torch.equal(loaded.scorer.spectrogram_std, scorer.spectrogram_std)
    assert loaded.config == config
    assert loaded.metadata.fitness == 0.875 and loaded.metadata.training_tasks == ["passkey", "needle"]


def test_model_card_is_rendered_from_the_metadata(tmp_path):
    save_scorer(tmp_path / "s", calibrated_scorer(), NAMMConfig(), METADATA, repo_id="org/s")
    card = (tmp_path / "s" / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: namm-cache" in header and "license: apache-2.0" in header
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in header and "namm-bam" in header
    assert "| passkey | 0.9 | 0.25 |" in card
    assert "4,172 parameters" in card and "0.8750" in card
    assert 'NAMMCache.from_pretrained("org/s"' in card
    assert "at least the top" not in card
    save_scorer(tmp_path / "f", calibrated_scorer(), NAMMConfig(min_fraction=0.3), METADATA, repo_id="org/f")
    floored = (tmp_path / "f" / "README.md").read_text()
    assert "keep score >= 0.0, at least the top 0.3 of the tokens seen" in floored and floored.count("at least the top") == 1
    assert load_scorer(tmp_path / "f").config.min_fraction == 0.3  # saved and loaded with the scorer
    assert "held tokens on either side" not in card
    save_scorer(tmp_path / "n", calibrated_scorer(), NAMMConfig(sinks=4, neighbours=4), METADATA, repo_id="org/n")
    spread = (tmp_path / "n" / "README.md").read_text()
    assert "the first 4 tokens (sinks); a token kept keeps the 4 held tokens on either side |" in spread
    loaded = load_scorer(tmp_path / "n")
    assert loaded.config.neighbours == 4 and "neighbours 4" in describe(loaded)
    assert "averaged" not in spread and "smoothing" not in describe(loaded)
    save_scorer(tmp_path / "m", calibrated_scorer(), NAMMConfig(neighbours=4, smoothing=8), METADATA, repo_id="org/m")
    smoothed = (tmp_path / "m" / "README.md").read_text()
    assert "; each score is first averaged over the 8 held tokens on either side; a token kept keeps the 4" in smoothed
    loaded = load_scorer(tmp_path / "m")
    assert loaded.config.smoothing == 8 and "neighbours 4, smoothing 8" in describe(loaded)


def test_the_card_names_what_a_scorer_reads_and_what_a_linear_one_ignores(tmp_path):
    from namm_cache.scorers import build_scorer

    def card_of(scorer, name):
        save_scorer(tmp_path / name, scorer, NAMMConfig(), METADATA, repo_id=f"org/{name}")
        return " ".join((tmp_path / name / "README.md").read_text().split())

    assert "scores every cached token from its age and attention spectrogram and decides" in card_of(calibrated_scorer(), "bam")
    linear = build_scorer("linear_all_layers")  # 8 age + 17 spectrogram + key_norm, value_norm, all_layer_key_norm
    assert linear.inputs_read() == ([], ["age", "attention spectrogram", "key_norm", "value_norm", "all_layer_key_norm"])
    assert "scores every cached token alike (one constant score, whatever its age," in card_of(linear, "zero")
    from namm_cache import BAMScorer
    assert "alike (one constant score, whatever its age and attention spectrogram)" in card_of(BAMScorer(), "keep")
    flat = linear.get_flat_params()
    flat[27], flat[3] = -1.0, 0.5  # all_layer_key_norm, one age dimension
    linear.set_flat_params(flat)
    assert linear.inputs_read() == (["age", "all_layer_key_norm"], ["attention spectrogram", "key_norm", "value_norm"])
    assert ("scores every cached token from its age and all_layer_key_norm (the weights on its attention spectrogram, "
            "key_norm and value_norm are zero) and decides") in card_of(linear, "rule")


def build_hf_cache(cache_dir: Path, repo_id: str, source: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay out files the way huggingface_hub's cache stores a downloaded repo (blobs + snapshot links)."""
    import hashlib

    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in source.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)


def test_load_by_repo_id_from_the_hf_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    assert constants.HF_HUB_OFFLINE, "tests run with HF_HUB_OFFLINE=1"
    scorer = calibrated_scorer()
    save_scorer(tmp_path / "saved", scorer, NAMMConfig(update_interval=64), METADATA, repo_id="acme/tiny-namm")
    build_hf_cache(tmp_path / "hf-cache", "acme/tiny-namm", tmp_path / "saved")
    from huggingface_hub import scan_cache_dir

    assert [r.repo_id for r in scan_cache_dir(tmp_path / "hf-cache").repos] == ["acme/tiny-namm"]
    model = tiny_model("llama")
    cache = NAMMCache.from_pretrained("acme/tiny-namm", model=model, cache_dir=tmp_path / "hf-cache", max_tokens=32)
    assert cache.scorer_source == "Hub repository acme/tiny-namm"
    assert torch.equal(scores_of(cache.scorer), scores_of(scorer))
    assert cache.namm_config.update_interval == 64 and cache.namm_config.max_tokens == 32
    with torch.no_grad():
        for chunk in torch.randint(3, 100, (1, 160)).split(32, dim=1):
            model(input_ids=chunk, cache=cache)
    assert int(cache.namm_layers[0].kept_per_head().max()) <= 32 + 32


class RecordingApi(HfApi):
    """HfApi whose network calls are recorded instead of sent (the Hub is unreachable here)."""

    def __init__(self):
        super().__init__(token="hf_test")
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        operations = list(operations)
        # The files must be readable while the commit is built: hash them now, as an upload would.
        self.hashes = {op.path_in_repo: op.upload_info.sha256.hex() for op in operations}
        self.contents = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.calls.append(("create_commit", repo_id, operations, kwargs))
        return "commit-url"


def test_push_to_hub_builds_one_commit_with_config_weights_and_card(tmp_path):
    model = tiny_model("llama")
    cache = NAMMCache(model=model, scorer=calibrated_scorer(), update_interval=64)
    api = RecordingApi()
    assert cache.push_to_hub("acme/pushed", metadata=METADATA, api=api, create_pr=True) == "commit-url"
    (kind, repo, _), (commit_kind, commit_repo, operations, kwargs) = api.calls
    assert (kind, repo, commit_kind, commit_repo) == ("create_repo", "acme/pushed", "create_commit", "acme/pushed")
    assert kwargs["create_pr"] is True and kwargs["commit_message"]
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    files = {op.path_in_repo: op for op in operations}
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    # The commit carries exactly the bytes save_pretrained writes (hashed when the operation was built).
    import hashlib

    reference = cache.save_pretrained(tmp_path / "same", metadata=METADATA, repo_id="acme/pushed")
    for name in ("config.json", "README.md"):
        assert api.hashes[name] == hashlib.sha256((reference / name).read_bytes()).hexdigest(), name
    from safetensors.torch import load

    pushed, saved = load(api.contents["model.safetensors"]), load_file(str(reference / "model.safetensors"))
    assert pushed.keys() == saved.keys() and all(torch.equal(pushed[k], saved[k]) for k in saved)
    assert json.loads((reference / "config.json").read_text())["namm_config"]["update_interval"] == 64


def test_bundled_default_loads_by_name_offline():
    assert DEFAULT_SCORER in bundled_names()
    assert "namm-cache/smollm2-135m-attention-mass" in bundled_names()
    model = tiny_model("llama")
    cache = NAMMCache.from_pretrained(model=model)
    assert DEFAULT_SCORER == "namm-cache/smollm2-135m-linear"  # ahead of every baseline held out (budget; threshold)
    assert cache.scorer_source == f"bundled scorer {DEFAULT_SCORER}"
    assert cache.scorer.constant_score() is None and cache.namm_config.max_tokens is None
    assert cache.scorer.kind == "linear" and cache.namm_config.recent_window == 64
    keep_all = NAMMCache.from_pretrained("namm-cache/keep-all", model=model)
    assert keep_all.scorer.constant_score() == 0.0
    mass = NAMMCache.from_pretrained("namm-cache/smollm2-135m-attention-mass", model=model)
    assert mass.scorer.constant_score() is None
    assert not torch.equal(mass.scorer.spectrogram_std, torch.ones(17))  # calibrated statistics shipped
    evolved = NAMMCache.from_pretrained("namm-cache/smollm2-135m-bam", model=model)
    assert evolved.scorer.constant_score() is None and evolved.scorer.num_parameters() == 4172
    assert evolved.namm_config.max_tokens is None and evolved.namm_config.threshold == 0.0
    assert "Held-out evaluation" in (bundled_root() / "namm-cache/smollm2-135m-bam/README.md").read_text()
    # The linear scorer of the <= 30% gate, stored as held out on its threshold: 4 sinks, 64 recent, no cap.
    linear = NAMMCache.from_pretrained("namm-cache/smollm2-135m-linear", model=model)
    assert linear.scorer.kind == "linear" and linear.scorer.num_parameters() == 28
    assert (linear.namm_config.sinks, linear.namm_config.recent_window, linear.namm_config.max_tokens) == (4, 64, None)
    card = (bundled_root() / "namm-cache/smollm2-135m-linear/README.md").read_text()
    assert "| threshold, 64 recent |" in card and "| budget 23%, 64 recent |" in card


def test_cli_info_and_list():
    run = lambda *args: subprocess.run([sys.executable, "-m", "namm_cache.cli", *args], capture_output=True, text=True)
    listed = run("list")
    assert listed.returncode == 0 and DEFAULT_SCORER in listed.stdout
    info = run("info", "namm-cache/smollm2-135m-attention-mass")
    assert info.returncode == 0
    assert "scorer: mlp (2,508 parameters" in info.stdout and "SmolLM2-135M-Instruct" in info.stdout
    missing = run("info", "nobody/nothing")
    assert missing.returncode == 2 and "Cannot find scorer" in missing.stderr


# ------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def saved(tmp_path) -> Path:
    return save_scorer(tmp_path / "s", calibrated_scorer(), NAMMConfig(), METADATA)


def test_a_folder_with_only_a_pickle_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(calibrated_scorer().state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    with pytest.raises(ScorerLoadError, match="safetensors only"):
        load_folder(folder)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_files_are_named(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(ScorerLoadError, match=f"missing {missing}"):
        load_folder(saved)


def edit_config(folder: Path, **changes):
    payload = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        target = payload
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    (folder / "config.json").write_text(json.dumps(payload))


def test_unknown_format_version(saved):
    edit_config(saved, format_version=99)
    with pytest.raises(ScorerLoadError, match="format_version 99 is not supported"):
        load_folder(saved)


def test_unknown_scorer_kind(saved):
    edit_config(saved, **{"scorer.kind": "lstm"})
    with pytest.raises(ScorerLoadError, match="unknown scorer kind 'lstm'"):
        load_folder(saved)


def test_feature_config_the_scorer_cannot_read(saved):
    edit_config(saved, **{"namm_config.recency_dim": 4})
    with pytest.raises(ScorerLoadError, match="reads 25 features"):
        load_folder(saved)


def test_wrong_tensor_shapes(saved):
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["readout.weight"] = torch.zeros(1, 24)
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(ScorerLoadError, match="'readout.weight' has shape \\(1, 24\\)"):
        load_folder(saved)


def test_nan_tensors(saved):
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["query.bias"][3] = float("nan")
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(ScorerLoadError, match="'query.bias' contains NaN"):
        load_folder(saved)


def test_a_name_that_resolves_nowhere_leaves_the_model_untouched():
    model = tiny_model("llama")
    with pytest.raises(ScorerLoadError, match="Cannot find scorer 'nobody/nothing'.*no bundled scorer"):
        NAMMCache.from_pretrained("nobody/nothing", model=model)
    assert model.config._attn_implementation == "sdpa"  # nothing half-done
    with pytest.raises(ScorerLoadError, match="not a Hub repository id .*a bundled scorer is named 'namm-cache/keep-all'"):
        NAMMCache.from_pretrained("keep-all", model=model)
    with pytest.raises(ScorerLoadError, match="not a Hub repository id .*bundled: .*namm-cache/smollm2-135m-linear"):
        NAMMCache.from_pretrained("nothing-like-it", model=model)


def test_overrides_cannot_break_the_scorer(saved):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="n_fft|reads 25 features|twice hop_length"):
        NAMMCache.from_pretrained(saved, model=model, n_fft=16)
    with pytest.raises(ValueError, match="Unknown NAMMConfig field"):
        NAMMCache.from_pretrained(saved, model=model, window=3)
