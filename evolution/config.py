"""Evolution run configuration: a YAML or TOML file plus `--set key=value` overrides, validated up front."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from namm_cache import NAMMConfig
from namm_cache.budgets import parse_budget
from namm_cache.offline import OFFLINE_MODELS
from namm_cache.tasks import HELDOUT_TEXT, TRAINING_TEXT, build_task
from namm_cache.validation import (check_bool, check_choice, check_float, check_int, check_known_keys, check_mapping,
                                   did_you_mean)

from .cmaes import MAX_POPULATION

STAGE_NAMM_KEYS = ("update_interval", "threshold", "max_tokens")
FITNESS_KINDS = ("exact", "replay")
MAX_SEED = 2**31 - 1  # seeds numpy generators (seed + stage + 1 must stay below 2**32)


@dataclass
class Stage:
    """One incremental stage: its tasks and how many generations it runs (warm-started from the last).

    `namm` overrides runtime settings of the run's `namm` for this stage and the ones after it (only
    update_interval, threshold and max_tokens: the scorer's inputs cannot change); `memory_weight` likewise
    replaces the run's memory weight from this stage on. A stage may add no tasks (`tasks: []`) and only change
    these, e.g. drop the cap so the score threshold alone decides what is kept, with a memory term."""

    tasks: list[dict[str, Any]]
    generations: int
    namm: dict[str, Any] = field(default_factory=dict)
    memory_weight: float | None = None


@dataclass
class EvolutionConfig:
    """Everything a run needs. Defaults follow the paper where it applies (sigma0 0.065, mean 0).

    Attributes:
        model: an offline model name (`smollm2-135m-instruct`) or a local model folder.
        scorer: scorer kind and sizes, e.g. `{"kind": "bam", "hidden_dim": 32}`.
        namm: `NAMMConfig` fields (feature constants, update_interval, threshold, max_tokens).
        budget: optional budget while evolving (token count, fraction or "threshold").
        population: CMA-ES population size (paper: 32).
        sigma0: initial step size (paper: 0.065).
        separable: use the diagonal (separable) CMA-ES variant.
        seed: seeds CMA-ES and the prompts of every generation.
        prompts_per_task: examples per task per generation (all members see the same ones).
        prefill_chunk: tokens per forward when feeding prompts (default: update_interval).
        memory_weight: fitness = quality - memory_weight * mean kept fraction.
        calibration_prompts: prompts used to calibrate the normalisation statistics before generation 0.
        threads: torch threads per process.
        stages: incremental stages.
        initial_scorer: a scorer folder or name (e.g. one written by `namm_cache.evolution.distill`) whose
            weights are the initial CMA-ES mean and whose normalisation statistics replace the keep-all
            calibration; None starts from the zero scorer (keeps everything), as the paper does.
        fitness: "exact" (every member feeds every prompt through its own cache) or "replay" (one observing
            full-cache pass per prompt, each member's evictions replayed on it: `evolution/replay.py`).
        replay_refeed: with `fitness: replay`, the prompt's last this many tokens (before the last one) are fed
            again through each member's kept tokens before the answer, with the member's eviction rounds
            among them, so the question reads only what the member kept (`record_prompt`). 0: none.
        validation_prompts_per_task: size per task of a fixed validation set (drawn once per stage, never
            trained on, apart from the held-out set) on which the distribution mean is scored exactly every
            `validation_every` generations; 0 turns validation off.
        validation_every: generations between validation scores (the last generation of a stage always has one).
        validation_baselines: baseline policies scored once per stage on the validation set, at the stage's cap
            (`max_tokens`) as a token budget, or in a stage without one at the run's `budget` (a token count or
            fraction; a threshold stage has none), and drawn beside the curve (e.g. `[h2o, key_norm]`).
    """

    model: str = "smollm2-135m-instruct"
    scorer: dict[str, Any] = field(default_factory=lambda: {"kind": "bam", "hidden_dim": 32})
    namm: dict[str, Any] = field(default_factory=dict)
    budget: Any = None
    population: int = 16
    sigma0: float = 0.065
    separable: bool = False
    seed: int = 0
    prompts_per_task: int = 2
    prefill_chunk: int | None = None
    memory_weight: float = 0.0
    calibration_prompts: int = 4
    threads: int = 2
    stages: list[Stage] = field(default_factory=lambda: [Stage(tasks=[{"name": "passkey", "tokens": 1000}], generations=10)])
    initial_scorer: str | None = None
    fitness: str = "exact"
    replay_refeed: int = 0
    validation_prompts_per_task: int = 0
    validation_every: int = 5
    validation_baselines: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvolutionConfig":
        """Build and validate a config from parsed YAML / TOML. Every problem is one `ValueError` (or
        `FileNotFoundError` for a missing model / data file) naming the setting."""
        data = copy.deepcopy(check_mapping("The evolution config", data))
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in known]
        if unknown:
            hints = "".join(did_you_mean(key, known) for key in unknown)
            raise ValueError(f"Unknown config key(s) {sorted(unknown)}.{hints} Known: {sorted(known)}.")
        if "stages" in data:
            data["stages"] = [_stage_from(i, stage) for i, stage in enumerate(_list("stages", data["stages"]))]
        config = cls(**data)
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> "EvolutionConfig":
        """Read a YAML / TOML file (or defaults if None) and apply `key=value` overrides (dotted keys, YAML values)."""
        data: Any = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"Config file {path} not found.")
            try:
                data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else (yaml.safe_load(path.read_text()) or {})
            except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as error:
                raise ValueError(f"Config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: "
                                 f"{' '.join(str(error).split())}") from None
            data = check_mapping(f"Config file {path}", data)
        for override in overrides or []:
            if "=" not in override:
                raise ValueError(f"Override {override!r} must look like key=value (e.g. population=8, stages.0.generations=3).")
            key, raw = override.split("=", 1)
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as error:
                raise ValueError(f"Override {override!r}: the value is not valid YAML ({' '.join(str(error).split())}).") from None
            set_dotted(data, key.strip(), value)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ checks before any work
    def namm_config(self, stage: int | None = None) -> NAMMConfig:
        """The run's NAMM settings, with the overrides of stages 0..`stage` applied (None: the run's own)."""
        settings = dict(self.namm)
        for earlier in self.stages[: (stage + 1) if stage is not None else 0]:
            settings.update(earlier.namm)
        return NAMMConfig.from_dict(settings)

    def stage_memory_weight(self, stage: int) -> float:
        """The memory weight in force at `stage` (the last stage up to it that sets one, else the run's)."""
        weight = self.memory_weight
        for earlier in self.stages[: stage + 1]:
            if earlier.memory_weight is not None:
                weight = earlier.memory_weight
        return weight

    def chunk(self, stage: int | None = None) -> int:
        return self.prefill_chunk or self.namm_config(stage).update_interval

    def validate(self) -> None:
        """Check every setting (types, ranges, finite numbers), the scorer, each stage's NAMM settings and tasks,
        and that the model exists and every prompt fits its context window: all before any work."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be an offline model name or a folder path, got {self.model!r}.")
        population = check_int("population", self.population)
        if population < 2:
            raise ValueError(f"population must be >= 2 (CMA-ES needs several members), got {population}.")
        check_int("population", population, maximum=MAX_POPULATION)
        self.population = population
        self.sigma0 = check_float("sigma0", self.sigma0, above=0.0)
        self.separable = check_bool("separable", self.separable)
        self.seed = check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        self.prompts_per_task = check_int("prompts_per_task", self.prompts_per_task, minimum=1)
        self.calibration_prompts = check_int("calibration_prompts", self.calibration_prompts, minimum=1)
        self.prefill_chunk = check_int("prefill_chunk", self.prefill_chunk, minimum=1, optional=True)
        self.memory_weight = check_float("memory_weight", self.memory_weight, minimum=0.0)
        self.threads = check_int("threads", self.threads, minimum=1)
        self.fitness = check_choice("fitness", self.fitness, FITNESS_KINDS)
        self.replay_refeed = check_int("replay_refeed", self.replay_refeed, minimum=0, maximum=2**40)
        if self.replay_refeed and self.fitness != "replay":
            raise ValueError(f"replay_refeed ({self.replay_refeed}) applies to fitness: replay only; the config sets fitness: {self.fitness}.")
        self.validation_prompts_per_task = check_int("validation_prompts_per_task", self.validation_prompts_per_task, minimum=0)
        self.validation_every = check_int("validation_every", self.validation_every, minimum=1)
        from namm_cache.policies import COMPARABLE_POLICIES

        if not isinstance(self.validation_baselines, list):
            raise ValueError(f"validation_baselines must be a list of baseline policies, got {self.validation_baselines!r}.")
        self.validation_baselines = [check_choice("validation_baselines", name, sorted(COMPARABLE_POLICIES))
                                     for name in self.validation_baselines]
        self.namm = check_mapping("namm", self.namm)
        if not self.stages or not all(isinstance(stage, Stage) for stage in self.stages):
            raise ValueError("Give at least one stage (stages: a list of {tasks: [...], generations: N}).")
        for i, stage in enumerate(self.stages):
            _check_stage(i, stage)
        for index in [None, *range(len(self.stages))]:
            self.namm_config(index)  # every stage's settings must be valid
        parse_budget(self.budget)
        self.scorer = _check_scorer(self.scorer, self.namm_config())
        if self.initial_scorer is not None:
            self.load_initial_scorer()  # it must exist and match the scorer and feature settings: checked now
        tasks = [_build_task_at(f"stages[{i}].tasks[{j}]", task)  # unknown task, bad arguments: raise now
                 for i, stage in enumerate(self.stages) for j, task in enumerate(stage.tasks)]
        if not self.all_tasks(0):
            raise ValueError("stages[0] must have at least one task (later stages may add none).")
        resolve_model_path(self.model)
        window = model_context_window(self.model)
        for task in tasks:
            check_fits_context(task, window, self.model)

    def load_initial_scorer(self):
        """The `initial_scorer`, loaded and checked against `scorer` and the feature settings (ValueError if not)."""
        from namm_cache.hub import load_scorer

        if not isinstance(self.initial_scorer, str) or not self.initial_scorer:
            raise ValueError(f"initial_scorer must be a scorer folder or name, got {self.initial_scorer!r}.")
        loaded = load_scorer(self.initial_scorer)
        wanted = {"kind": "bam", **self.scorer}
        have = loaded.scorer.config_dict()
        mismatched = {key: (have.get(key), value) for key, value in wanted.items() if have.get(key) != value}
        features = ("n_fft", "hop_length", "ema_gamma", "recency_dim", "recency_max_frequency")
        ours = self.namm_config()
        mismatched.update({key: (getattr(loaded.config, key), getattr(ours, key)) for key in features
                           if getattr(loaded.config, key) != getattr(ours, key)})
        if mismatched:
            shown = ", ".join(f"{key} {a!r} there, {b!r} here" for key, (a, b) in mismatched.items())
            raise ValueError(f"initial_scorer {self.initial_scorer} does not fit this run's scorer and features: {shown}.")
        return loaded

    def all_tasks(self, stage_index: int) -> list[dict[str, Any]]:
        """Tasks of a stage: incremental stages grow the task list (each stage adds its tasks)."""
        tasks: list[dict[str, Any]] = []
        for stage in self.stages[: stage_index + 1]:
            tasks += [task for task in stage.tasks if task not in tasks]
        return tasks


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"Override key {key!r} has an empty part (write e.g. stages.0.generations=3).")
    target: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(target, list):
            target = target[_list_index(key, part, len(target))]
        elif isinstance(target, dict):
            if part not in target:
                target[part] = [] if nxt.isdigit() else {}
            target = target[part]
        else:
            raise ValueError(f"Override {key!r}: {'.'.join(parts[:i])} is {target!r}, which has no part {part!r}.")
    last = parts[-1]
    if not isinstance(target, (list, dict)):
        raise ValueError(f"Override {key!r}: {'.'.join(parts[:-1])} is {target!r}, which has no part {last!r}.")
    if isinstance(target, list):
        index = _list_index(key, last, len(target) + 1)
        if index == len(target):
            target.append(value)  # `stages.2=...` on a 2-stage config adds a stage
        elif 0 <= index < len(target):
            target[index] = value
        else:
            raise ValueError(f"Override {key!r}: index {index} is past the end of a list of {len(target)} (append at {len(target)}).")
    else:
        target[last] = value


def _list_index(key: str, part: str, length: int) -> int:
    if not part.isdigit() or int(part) >= length:
        raise ValueError(f"Override {key!r}: {part!r} is not an index of a list of {length if length else 'no'} item(s).")
    return int(part)


def _list(name: str, value: Any) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list, got {type(value).__name__}: {value!r}.")
    return value


def _stage_from(i: int, stage: Any) -> Stage:
    where = f"stages[{i}]"
    if not isinstance(stage, dict) or set(stage) - {"tasks", "generations", "namm", "memory_weight"} or "tasks" not in stage:
        raise ValueError(f"{where} must be a mapping with 'tasks' and 'generations' (optional: 'namm', 'memory_weight').")
    namm = check_mapping(f"{where}.namm", stage.get("namm") or {})
    if set(namm) - set(STAGE_NAMM_KEYS):
        raise ValueError(f"{where}.namm may only set {', '.join(STAGE_NAMM_KEYS)}, not {sorted(set(namm) - set(STAGE_NAMM_KEYS))}.")
    return Stage(tasks=list(_list(f"{where}.tasks", stage["tasks"] or [])), generations=stage.get("generations", 1), namm=namm,
                 memory_weight=stage.get("memory_weight"))


def _check_stage(i: int, stage: Stage) -> None:
    where = f"stages[{i}]"
    stage.generations = check_int(f"{where}.generations", stage.generations, minimum=1)
    stage.memory_weight = check_float(f"{where}.memory_weight", stage.memory_weight, minimum=0.0, optional=True)
    for j, task in enumerate(_list(f"{where}.tasks", stage.tasks)):
        if not isinstance(task, (str, dict)):
            raise ValueError(f"{where}.tasks[{j}] must be a task name or a mapping like {{name: passkey, tokens: 1000}}, got {task!r}.")


def _build_task_at(where: str, spec: Any):
    try:
        task = build_task(spec)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if getattr(task, "source", None) == HELDOUT_TEXT:  # held-out numbers are only honest on text never trained on
        raise ValueError(f"{where}: {HELDOUT_TEXT!r} is the held-out text (evaluation, benchmarks, the lm-eval pack); "
                         f"train on {TRAINING_TEXT!r}, 'filler' or a text file of your own.")
    return task


def _check_scorer(spec: Any, namm: NAMMConfig) -> dict[str, Any]:
    """The scorer spec `{kind, **sizes}`: a known kind and only the arguments its constructor takes (the feature
    sizes come from `namm`); the constructor checks the values before it allocates anything."""
    from namm_cache.scorers import SCORER_KINDS, build_scorer

    spec = check_mapping("scorer", spec)
    kind = check_choice("scorer.kind", spec.get("kind", "bam"), sorted(SCORER_KINDS))
    arguments = {name: value for name, value in spec.items() if name != "kind"}
    accepted = [name for name in inspect.signature(SCORER_KINDS[kind].__init__).parameters
                if name not in ("self", "input_dim", "n_bins")]
    check_known_keys(f"scorer (kind {kind!r})", arguments, accepted)
    build_scorer(kind, input_dim=SCORER_KINDS[kind].input_dim_for(namm), n_bins=namm.n_bins, **arguments)
    return spec


def model_context_window(model: str) -> int | None:
    """The model's context window (`max_position_embeddings`) read from its config.json without loading weights;
    None when it cannot be known yet (an offline model not converted so far: checked again after loading)."""
    from namm_cache.offline import converted_path

    folder = converted_path(model) if model in OFFLINE_MODELS else Path(model).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    window = config.get("max_position_embeddings")
    if window is None and isinstance(config.get("text_config"), dict):
        window = config["text_config"].get("max_position_embeddings")
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def check_fits_context(task: Any, window: int | None, model: str) -> None:
    """Refuse a task whose prompts (plus answer) are longer than the model's context window."""
    needed = task.context_tokens()
    if window is not None and needed is not None and needed > window:
        raise ValueError(f"Task {task.name!r} needs up to {needed} tokens (prompt + answer), more than the context window "
                         f"of {model} ({window} tokens); lower its tokens.")


def resolve_model_path(model: str) -> str:
    """An offline model name or an existing local folder; anything else is refused before work starts."""
    if model in OFFLINE_MODELS:
        return model
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    raise FileNotFoundError(
        f"Model {model!r} not found: give an offline model name ({', '.join(OFFLINE_MODELS)}) or a local folder with "
        "config.json (the Hub cannot be reached)."
    )
