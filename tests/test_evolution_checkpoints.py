"""Evolution reliability (issue 12): exact CMA-ES resume, checkpoints that are data, run-folder rules, and one
clear error (exit status 2, one line, no traceback) for every bad folder or checkpoint. (The SIGKILL test of a
real run is in test_evolution.py; config values are in test_evolution_config.py.)"""

from __future__ import annotations

import json
import math
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from namm_cache.evolution.checkpoint import CheckpointError, RunState, check_run_folder, read_checkpoint, write_checkpoint
from namm_cache.evolution.cli import main as namm_evolve
from namm_cache.evolution.cmaes import CMAES

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------- helpers
def differences(a, b, path="es", pairs=None) -> list[str]:
    """Where two live object graphs differ: values (arrays by dtype, shape, memory order and bits), types,
    attribute sets, and sharing (an object shared in one graph must be shared the same way in the other).
    Skips the sampler's generator (compared separately), loggers and timers."""
    pairs = {} if pairs is None else pairs
    if id(a) in pairs:
        return [] if pairs[id(a)] is b else [f"{path}: shared differently"]
    if isinstance(a, (list, dict, np.ndarray)) or hasattr(a, "__dict__"):
        pairs[id(a)] = b
    if type(a) is not type(b):
        return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, np.ndarray):
        same = (a.dtype == b.dtype and a.shape == b.shape and a.strides == b.strides and a.tobytes() == b.tobytes()
                and a.flags.writeable == b.flags.writeable and (a.base is None) == (b.base is None))
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        if root is not a and id(root) in pairs and not np.shares_memory(b, pairs[id(root)]):
            return [f"{path}: a view of an array in one graph, not in the other"]
        return [] if same else [f"{path}: arrays differ"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{path}: keys differ"]
        return [d for k in a if k != "randn" for d in differences(a[k], b[k], f"{path}[{k!r}]", pairs)]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths differ"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]", pairs)]
    if type(a).__module__.startswith("cma"):
        if set(vars(a)) != set(vars(b)):
            return [f"{path}: attributes differ: {sorted(set(vars(a)) ^ set(vars(b)))}"]
        return [d for k in vars(a) if k not in ("logger", "timer", "randn")
                for d in differences(getattr(a, k), getattr(b, k), f"{path}.{k}", pairs)]
    if callable(a):
        return []
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def state_with(es: CMAES, **fields) -> RunState:
    return RunState(es=es, normalization=([0.5] * 17, [2.0] * 17), numpy_rng=np.random.get_state(),
                    python_rng=random.getstate(), torch_rng=torch.get_rng_state(), **fields)


def through_checkpoint(es: CMAES, folder: Path) -> CMAES:
    write_checkpoint(folder / "checkpoint.safetensors", state_with(es))
    return read_checkpoint(folder / "checkpoint.safetensors").es


# ------------------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("population", [4, 8])  # 4: pycma mirrors samples (extra state between generations)
def test_cma_state_survives_checkpoints_exactly(tmp_path, separable, population):
    """A strategy written to a checkpoint and read back at several generations equals, attribute by attribute,
    one that never stopped, and draws exactly the same populations for 30 generations."""
    target = np.linspace(-1, 1, 12)
    fitness = lambda xs: [round(-float(((x - target) ** 2).sum()), 1) for x in xs]  # rounding: ties, flat generations
    resumed = CMAES(np.zeros(12), 0.5, population, 3, separable)
    straight = CMAES(np.zeros(12), 0.5, population, 3, separable)
    for es in (resumed, straight):  # objects shared within the state stay shared (pycma shares arrays and lists)
        es.strategy.shared_list_a = es.strategy.shared_list_b = [1.0, 2.0]
    for generation in range(30):
        if generation in (1, 2, 7, 16):
            resumed = through_checkpoint(resumed, tmp_path)
            assert differences(resumed.strategy, straight.strategy) == []
            assert all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
                       for x, y in zip(resumed.random.get_state(), straight.random.get_state()))
        assert resumed.strategy.shared_list_a is resumed.strategy.shared_list_b
        a, b = resumed.ask(), straight.ask()
        assert np.array_equal(a, b), f"generation {generation} differs"
        scores = fitness(a)
        resumed.tell(a, scores)
        straight.tell(b, scores)
    assert np.array_equal(resumed.mean, straight.mean) and resumed.sigma == straight.sigma


def test_cma_samples_do_not_depend_on_numpy_global_generator():
    """pycma draws from numpy's global generator besides its sampler (TPA's consistency check); with the
    sampler on that same generator, a resumed run (whose sampler no longer shares it) parted ways. The samples
    must not depend on anything drawn from or done to the global generator."""
    quiet, disturbed = CMAES(np.zeros(40), 0.3, 6, 1, False), CMAES(np.zeros(40), 0.3, 6, 1, False)
    for generation in range(12):
        a = quiet.ask()
        np.random.seed(generation)
        np.random.randint(0, 100, size=generation + 1)
        b = disturbed.ask()
        assert np.array_equal(a, b), f"generation {generation}"
        scores = [-float((x ** 2).sum()) for x in a]
        quiet.tell(a, scores)
        disturbed.tell(b, scores)


def test_run_state_round_trip(tmp_path):
    es = CMAES(np.zeros(5), 0.2, 4, 0, True)
    np.random.seed(5)
    random.seed(6)
    torch.manual_seed(7)
    log = [{"generation": 0, "stage": 0, "tasks": ["passkey"], "fitness_best": 0.25, "fitness_mean_population": 0.2,
            "fitness_distribution_mean": 0.3, "quality_distribution_mean": 0.4, "kept_distribution_mean": 0.5,
            "kept_best": 0.6, "per_task_distribution_mean": {"passkey": 1 / 3}}]
    state = state_with(es, generation=3, stage=1, stage_generation=2, log=log, validated={2: np.arange(5.0), 0: -np.ones(5)})
    write_checkpoint(tmp_path / "checkpoint.safetensors", state)
    back = read_checkpoint(tmp_path / "checkpoint.safetensors")
    assert (back.generation, back.stage, back.stage_generation, back.log) == (3, 1, 2, log)
    assert list(back.validated) == [0, 2] and np.array_equal(back.validated[2], np.arange(5.0))
    assert back.normalization == ([0.5] * 17, [2.0] * 17)
    np.random.set_state(back.numpy_rng)
    random.setstate(back.python_rng)
    torch.set_rng_state(back.torch_rng)
    after = (np.random.rand(), random.random(), torch.rand(1).item())
    np.random.seed(5)
    random.seed(6)
    torch.manual_seed(7)
    assert after == (np.random.rand(), random.random(), torch.rand(1).item())
    assert not (tmp_path / "checkpoint.safetensors.tmp").exists()  # written to a temporary name, then renamed


# ------------------------------------------------------------------------- checkpoints that are data
class Payload:
    """Unpickling this creates `marker`: proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def rewrite(path: Path, document=None, arrays=None, metadata=None) -> None:
    """Re-save checkpoint `path` after `document(state_json)` / `arrays(dict)` / `metadata(dict)` edit it in place."""
    from safetensors import safe_open
    from safetensors.numpy import save

    with safe_open(str(path), framework="np") as handle:
        meta = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    state = json.loads(meta["state"])
    if document:
        document(state)
    if arrays:
        arrays(tensors)
    meta["state"] = json.dumps(state)
    if metadata:
        metadata(meta)
    path.write_bytes(save(tensors, metadata=meta))


def strategy_attributes(state):
    return state["cma_es"]["strategy"]["attributes"]


CRAFTED = {
    "a pickle": lambda path, marker: path.write_bytes(pickle.dumps(Payload(marker))),
    "truncated": lambda path, marker: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
    "empty": lambda path, marker: path.write_bytes(b""),
    "another format": lambda path, marker: rewrite(path, metadata=lambda m: m.update(format="something-else")),
    "a future version": lambda path, marker: rewrite(path, metadata=lambda m: m.update(version="99")),
    "state not JSON": lambda path, marker: rewrite(path, metadata=lambda m: m.update(state="{not json")),
    "a class swapped for a function": lambda path, marker: rewrite(
        path, document=lambda s: s["cma_es"]["strategy"].update(object="os.system")),
    "a dunder attribute": lambda path, marker: rewrite(
        path, document=lambda s: strategy_attributes(s).update(__class__={"object": "os.system", "attributes": {}})),
    "options with code": lambda path, marker: rewrite(
        path, document=lambda s: strategy_attributes(s).update(opts=f"open({str(marker)!r}, 'w')")),
    "options restored": lambda path, marker: rewrite(
        path, document=lambda s: strategy_attributes(s).update(inputargs={"list": ["__import__('os')"]})),
    "a method replaced": lambda path, marker: rewrite(path, document=lambda s: strategy_attributes(s).update(ask=1)),
    "a view outside its array": lambda path, marker: rewrite(
        path, document=lambda s: strategy_attributes(s)["dC"].update(offset=10**6)),
    "a view with huge strides": lambda path, marker: rewrite(
        path, document=lambda s: strategy_attributes(s)["dC"].update(strides=[8 * 10**9])),
    "an array missing": lambda path, marker: rewrite(path, arrays=lambda a: a.pop("es/strategy.mean")),
    "a forward reference": lambda path, marker: rewrite(
        path, document=lambda s: strategy_attributes(s).update(mean={"same_as": "strategy.nothing"})),
    "a negative generation": lambda path, marker: rewrite(path, document=lambda s: s.update(generation=-1)),
    "NaN statistics": lambda path, marker: rewrite(path, document=lambda s: s["normalization"][0].__setitem__(0, float("nan"))),
    "a wrong generator": lambda path, marker: rewrite(path, arrays=lambda a: a.update({"es/rng.key": np.zeros(3, dtype=np.uint32)})),
    "implausible settings": lambda path, marker: rewrite(
        path, document=lambda s: s["cma_es"]["settings"].update(population=10**12)),
}


def huge_full_covariance(path: Path, marker: Path) -> None:
    """A small file that asks for a 30,000-dimensional full-covariance strategy (7 GB per matrix when built)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        x0 = strategy_attributes(json.loads(handle.metadata()["state"]))["x0"]["array"]
    rewrite(path, document=lambda s: s["cma_es"]["settings"].update(dim=30000, separable=False),
            arrays=lambda a: a.update({"es/" + x0: np.zeros(30000)}))


CRAFTED.update({
    "a huge full covariance in a small file": huge_full_covariance,
    "a zero std": lambda path, marker: rewrite(path, document=lambda s: s["normalization"][1].__setitem__(0, 0.0)),
    "a log row without its keys": lambda path, marker: rewrite(path, document=lambda s: s.update(log=[{}])),
    "NaN in the mean": lambda path, marker: rewrite(
        path, arrays=lambda a: a.update({"es/strategy.mean": np.full_like(a["es/strategy.mean"], np.nan)})),
    "a validated mean of the wrong size": lambda path, marker: rewrite(path, arrays=lambda a: a.update({"validated/1": np.zeros(5)})),
    "a validated mean with NaN": lambda path, marker: rewrite(path, arrays=lambda a: a.update({"validated/1": np.full(6, np.nan)})),
    "a validated mean of no generation": lambda path, marker: rewrite(path, arrays=lambda a: a.update({"validated/x": np.zeros(6)})),
    "a validated mean of a generation not run": lambda path, marker: rewrite(path, arrays=lambda a: a.update({"validated/2": np.zeros(6)})),
    "a validated mean with a padded number": lambda path, marker: rewrite(path, arrays=lambda a: a.update({"validated/01": np.zeros(6)})),
})


@pytest.mark.parametrize("damage", list(CRAFTED))
def test_a_crafted_or_damaged_checkpoint_is_one_clear_error_and_runs_no_code(tmp_path, damage):
    path = tmp_path / "checkpoint.safetensors"
    write_checkpoint(path, state_with(CMAES(np.zeros(6), 0.3, 4, 0, False), generation=2))
    marker = tmp_path / "code-ran"
    CRAFTED[damage](path, marker)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_a_small_file_cannot_make_the_reader_build_a_huge_strategy(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    write_checkpoint(path, state_with(CMAES(np.zeros(6), 0.3, 4, 0, False), generation=2))
    huge_full_covariance(path, tmp_path / "unused")
    assert path.stat().st_size < 2**20
    with pytest.raises(CheckpointError, match="needs its 30000 x 30000 covariance"):  # refused before building anything
        read_checkpoint(path)


def test_an_old_pickle_checkpoint_is_never_loaded(tmp_path):
    marker = tmp_path / "code-ran"
    (tmp_path / "checkpoint.pkl").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="pickle.*convert_checkpoint"):
        check_run_folder(tmp_path, resume=True)
    assert not marker.exists()


def test_the_committed_run_was_converted_without_loss():
    """runs/smollm2-bam: the data checkpoint holds generation 44 and what its log and exported scorer say."""
    from namm_cache.hub import load_scorer

    run = ROOT / "runs" / "smollm2-bam"
    assert not (run / "checkpoint.pkl").exists()
    state = read_checkpoint(run / "checkpoint.safetensors")
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert (state.generation, state.stage, state.stage_generation) == (44, 3, 12)
    assert state.log == rows and state.es.sigma == rows[-1]["sigma"]
    assert state.es.settings == {"dim": 4172, "sigma0": 0.065, "population": 8, "seed": 3, "separable": True}
    scorer = load_scorer(run / "scorer").scorer
    assert torch.equal(scorer.get_flat_params(), torch.as_tensor(state.es.mean, dtype=torch.float32))
    assert torch.equal(scorer.spectrogram_mean, torch.tensor(state.normalization[0], dtype=scorer.spectrogram_mean.dtype))


# ----------------------------------------------------------------------------------- run folders
def test_run_folder_rules(tmp_path):
    missing, empty, used = tmp_path / "missing", tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    used.mkdir()
    (used / "log.jsonl").write_text("earlier run\n")
    for folder in (missing, empty, used):  # --resume with no checkpoint: an error naming the folder
        with pytest.raises(FileNotFoundError, match=f"no checkpoint.*{folder.name}|{folder.name}.*does not exist"):
            check_run_folder(folder, resume=True)
    assert check_run_folder(missing, resume=False) is None and check_run_folder(empty, resume=False) is None
    with pytest.raises(FileExistsError, match="not empty.*--resume.*--overwrite"):
        check_run_folder(used, resume=False)
    assert check_run_folder(used, resume=False, overwrite=True) is None
    with pytest.raises(ValueError, match="exclude each other"):
        check_run_folder(used, resume=True, overwrite=True)
    assert (used / "log.jsonl").read_text() == "earlier run\n" and not missing.exists()


@pytest.fixture
def weightless_model_dir(tmp_path, tiny_model_dir) -> Path:
    """The tiny model's config and tokenizer without its weights: loading it fails, so a test that passes with
    it shows that the check it makes came before any model was loaded."""
    folder = tmp_path / "weightless-model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


def small_config(path: Path, model_dir: Path, **extra) -> Path:
    import yaml

    config = {"model": str(model_dir), "scorer": {"kind": "mlp", "hidden_dim": 4}, "namm": {"update_interval": 32},
              "population": 4, "sigma0": 0.3, "seed": 1, "prompts_per_task": 1, "calibration_prompts": 1, "threads": 1,
              "stages": [{"tasks": [{"name": "passkey", "tokens": 100}], "generations": 1}], **extra}
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(capsys, *args) -> tuple[int, str]:
    code = namm_evolve([*map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("namm-evolve: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_refuses_folder_and_checkpoint_errors_before_loading_the_model(tmp_path, weightless_model_dir, capsys):
    config = small_config(tmp_path / "run.yaml", weightless_model_dir)
    out = tmp_path / "out"
    (out / "scorer").mkdir(parents=True)
    (out / "log.jsonl").write_text("an earlier run's log\n")
    (out / "scorer" / "model.safetensors").write_bytes(b"an earlier run's scorer")
    before = snapshot(out)
    assert_one_line_error(*run_cli(capsys, "--config", config, "--out", out, "--resume"), str(out), "no checkpoint")
    assert_one_line_error(*run_cli(capsys, "--config", config, "--out", out), str(out), "not empty", "--overwrite")
    assert_one_line_error(*run_cli(capsys, "--config", config, "--out", out, "--export", tmp_path / "x"), str(out))
    (out / "checkpoint.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    before["checkpoint.safetensors"] = (out / "checkpoint.safetensors").read_bytes()
    assert_one_line_error(*run_cli(capsys, "--config", config, "--out", out, "--resume"), "checkpoint.safetensors", "not a readable")
    assert_one_line_error(*run_cli(capsys, "--config", config, "--out", out, "--export", tmp_path / "x"), "not a readable")
    assert snapshot(out) == before and not (tmp_path / "x").exists()  # nothing in the run folder was touched


def test_overwrite_starts_over_deleting_only_the_runs_own_files(tmp_path, tiny_model_dir, capsys):
    config = small_config(tmp_path / "run.yaml", tiny_model_dir)
    out = tmp_path / "out"
    assert run_cli(capsys, "--config", config, "--out", out)[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "scorer" / "extra.txt").write_text("a file of the old export")
    first = read_checkpoint(out / "checkpoint.safetensors")
    before = snapshot(out)
    assert_one_line_error(*run_cli(capsys, "--config", config, "--out", out), "not empty")
    assert snapshot(out) == before
    assert run_cli(capsys, "--config", config, "--out", out, "--set", "seed=2", "--overwrite")[0] == 0
    second = read_checkpoint(out / "checkpoint.safetensors")
    assert second.generation == 1 and len(second.log) == 1 and not np.array_equal(first.es.mean, second.es.mean)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "scorer" / "extra.txt").exists()


def test_every_validated_mean_is_kept_and_exported_by_generation_or_best(tmp_path, tiny_model_dir, capsys):
    """The checkpoint keeps the mean each validation scored; `--export --generation G|best` writes that one."""
    from namm_cache.hub import load_scorer

    config = small_config(tmp_path / "run.yaml", tiny_model_dir, validation_prompts_per_task=1, validation_every=2,
                          stages=[{"tasks": [{"name": "passkey", "tokens": 100}], "generations": 4}])
    out = tmp_path / "out"
    assert run_cli(capsys, "--config", config, "--out", out)[0] == 0
    state = read_checkpoint(out / "checkpoint.safetensors")
    validated = {row["generation"]: row["validation"]["fitness"] for row in state.log if "validation" in row}
    assert sorted(state.validated) == sorted(validated) == [1, 3]
    assert not np.array_equal(state.validated[1], state.validated[3])
    assert not np.array_equal(state.validated[3], state.es.mean)  # what was validated, not the mean told since
    best = max(validated, key=lambda g: (validated[g], -g))
    for generation, expected in (("1", 1), ("3", 3), ("best", best)):
        folder = tmp_path / f"export-{generation}"
        assert namm_evolve(["--config", str(config), "--out", str(out), "--export", str(folder), "--generation", generation]) == 0
        assert f"the mean validated at generation {expected} of" in capsys.readouterr().out
        loaded = load_scorer(folder)
        assert np.array_equal(loaded.scorer.get_flat_params().numpy(), state.validated[expected].astype(np.float32))
        assert json.loads((folder / "config.json").read_text())["extra"]["generation"] == expected
        assert f"evaluated in generation {expected}, before" in (folder / "README.md").read_text()
    assert run_cli(capsys, "--config", config, "--out", out, "--export", tmp_path / "latest")[0] == 0
    latest = load_scorer(tmp_path / "latest").scorer.get_flat_params().numpy()
    assert np.array_equal(latest, state.es.mean.astype(np.float32))
    assert "generation" not in json.loads((tmp_path / "latest" / "config.json").read_text())["extra"]
    assert_one_line_error(*run_cli(capsys, "--config", config, "--out", out, "--export", tmp_path / "x", "--generation", "2"),
                          "generation 2 has no validated mean", "1, 3")
    assert not (tmp_path / "x").exists()
    for args, message in ((["--generation", "best"], "--generation goes with --export"),
                          (["--export", str(tmp_path / "y"), "--generation", "last"], "must be a generation number")):
        with pytest.raises(SystemExit) as exit_:
            namm_evolve(["--config", str(config), "--out", str(out), *args])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_best_compares_validations_of_the_last_validated_stage_only():
    from namm_cache.evolution.checkpoint import unkept_validations, validated_generation

    def row(generation, stage, fitness=None):
        base = {"generation": generation, "stage": stage, "tasks": ["passkey"], "fitness_best": 0.0,
                "fitness_mean_population": 0.0, "fitness_distribution_mean": 0.0, "quality_distribution_mean": 0.0,
                "kept_distribution_mean": 0.5, "kept_best": 0.5}
        return base if fitness is None else {**base, "validation": {"fitness": fitness, "prompts": 2}}

    # Stage 0's validation prompts are easier (no memory term): its 0.9 must not beat stage 1's 0.4.
    log = [row(0, 0, 0.8), row(1, 0, 0.9), row(2, 1), row(3, 1, 0.3), row(4, 1, 0.4), row(5, 1, 0.4), row(6, 1, 0.7)]
    state = state_with(CMAES(np.zeros(3), 0.3, 4, 0, True), generation=7, log=log,
                       validated={g: np.full(3, float(g)) for g in (0, 1, 3, 4, 5)})  # 6 validated before means were kept
    assert validated_generation(state, "best") == 4  # the earliest of stage 1's equal best kept means
    assert validated_generation(state, 1) == 1 and unkept_validations(state) == [6]
    with pytest.raises(CheckpointError, match="generation 6 has no validated mean .* kept: 0, 1, 3, 4, 5"):
        validated_generation(state, 6)
    assert read_checkpoint_of(state, "best") == 4


def read_checkpoint_of(state: RunState, generation) -> int:
    """`validated_generation` on `state` after a write and a read (the means survive the checkpoint)."""
    import tempfile

    from namm_cache.evolution.checkpoint import validated_generation

    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(Path(folder) / "checkpoint.safetensors", state)
        back = read_checkpoint(Path(folder) / "checkpoint.safetensors")
    assert all(np.array_equal(back.validated[g], state.validated[g]) for g in state.validated)
    return validated_generation(back, generation)


def test_a_checkpoint_without_validated_means_exports_its_latest_and_refuses_a_generation(tmp_path, tiny_model_dir, capsys):
    config = small_config(tmp_path / "run.yaml", tiny_model_dir)  # no validation set: nothing validated
    out = tmp_path / "out"
    assert run_cli(capsys, "--config", config, "--out", out)[0] == 0
    assert read_checkpoint(out / "checkpoint.safetensors").validated == {}
    assert_one_line_error(*run_cli(capsys, "--config", config, "--out", out, "--export", tmp_path / "x", "--generation", "best"),
                          "keeps no validated means")


# ------------------------------------------------------------------------ the committed run, for real
@pytest.mark.slow
def test_the_committed_run_resumes_and_exports_from_its_converted_checkpoint(tmp_path, capsys):
    """`--resume` on a copy of runs/smollm2-bam finds all 44 generations done and re-exports the same scorer;
    `--export` writes it too (loads SmolLM2-135M)."""
    from safetensors.torch import load_file

    run = tmp_path / "smollm2-bam"
    shutil.copytree(ROOT / "runs" / "smollm2-bam", run)
    committed = load_file(run / "scorer" / "model.safetensors")
    config = ROOT / "evolution" / "configs" / "smollm2.yaml"
    assert run_cli(capsys, "--config", config, "--out", run, "--export", tmp_path / "exported")[0] == 0
    assert run_cli(capsys, "--config", config, "--out", run, "--resume")[0] == 0
    for folder in (tmp_path / "exported", run / "scorer"):
        weights = load_file(folder / "model.safetensors")
        assert weights.keys() == committed.keys() and all(torch.equal(weights[k], committed[k]) for k in committed)
    assert read_checkpoint(run / "checkpoint.safetensors").generation == 44
