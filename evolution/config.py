"""Evolution run configuration: a YAML or TOML file plus `--set key=value` overrides, validated up front."""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from namm_cache import NAMMConfig
from namm_cache.budgets import parse_budget
from namm_cache.offline import OFFLINE_MODELS

from .tasks import build_task


STAGE_NAMM_KEYS = ("update_interval", "threshold", "max_tokens")


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

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvolutionConfig":
        data = copy.deepcopy(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown config key(s) {sorted(unknown)}; known: {sorted(known)}.")
        if "stages" in data:
            stages = []
            for i, stage in enumerate(data["stages"]):
                if not isinstance(stage, dict) or set(stage) - {"tasks", "generations", "namm", "memory_weight"} or "tasks" not in stage:
                    raise ValueError(f"stages[{i}] must be a mapping with 'tasks' and 'generations' (optional: 'namm', 'memory_weight').")
                namm = dict(stage.get("namm") or {})
                if set(namm) - set(STAGE_NAMM_KEYS):
                    raise ValueError(f"stages[{i}].namm may only set {', '.join(STAGE_NAMM_KEYS)}, not {sorted(set(namm) - set(STAGE_NAMM_KEYS))}.")
                weight = stage.get("memory_weight")
                stages.append(Stage(tasks=list(stage["tasks"] or []), generations=int(stage.get("generations", 1)), namm=namm,
                                    memory_weight=None if weight is None else float(weight)))
            data["stages"] = stages
        config = cls(**data)
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> "EvolutionConfig":
        """Read a YAML / TOML file (or defaults if None) and apply `key=value` overrides (dotted keys, YAML values)."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"Config file {path} not found.")
            data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else (yaml.safe_load(path.read_text()) or {})
        for override in overrides or []:
            if "=" not in override:
                raise ValueError(f"Override {override!r} must look like key=value (e.g. population=8, stages.0.generations=3).")
            key, raw = override.split("=", 1)
            set_dotted(data, key.strip(), yaml.safe_load(raw))
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
        if self.population < 2:
            raise ValueError(f"population must be >= 2 (CMA-ES needs several members), got {self.population}.")
        if self.sigma0 <= 0:
            raise ValueError(f"sigma0 must be > 0, got {self.sigma0}.")
        if self.prompts_per_task < 1 or self.calibration_prompts < 1:
            raise ValueError("prompts_per_task and calibration_prompts must be >= 1.")
        if not self.stages or any(stage.generations < 1 for stage in self.stages):
            raise ValueError("Give at least one stage, each with generations >= 1.")
        for index in [None, *range(len(self.stages))]:
            self.namm_config(index)  # every stage's settings must be valid
        parse_budget(self.budget)
        from namm_cache.scorers import build_scorer

        spec = dict(self.scorer)
        kind = spec.pop("kind", "bam")
        config = self.namm_config()
        build_scorer(kind, input_dim=config.feature_dim, n_bins=config.n_bins, **spec)
        for stage in self.stages:
            for task in stage.tasks:
                build_task(task)  # unknown task, bad arguments, missing data file: raise now
        resolve_model_path(self.model)

    def all_tasks(self, stage_index: int) -> list[dict[str, Any]]:
        """Tasks of a stage: incremental stages grow the task list (each stage adds its tasks)."""
        tasks: list[dict[str, Any]] = []
        for stage in self.stages[: stage_index + 1]:
            tasks += [task for task in stage.tasks if task not in tasks]
        return tasks


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    target: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(target, list):
            target = target[int(part)]
        else:
            if part not in target:
                target[part] = [] if nxt.isdigit() else {}
            target = target[part]
    last = parts[-1]
    if isinstance(target, list):
        index = int(last)
        if index == len(target):
            target.append(value)  # `stages.2=...` on a 2-stage config adds a stage
        elif 0 <= index < len(target):
            target[index] = value
        else:
            raise ValueError(f"Override {key!r}: index {index} is past the end of a list of {len(target)} (append at {len(target)}).")
    else:
        target[last] = value


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
