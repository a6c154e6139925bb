"""The CMA-ES loop: ask / evaluate (sharded over ranks) / tell, checkpoint every generation, resume exactly.

Rank 0 owns the `cma.CMAEvolutionStrategy`; each generation it broadcasts the population (plus the
distribution mean, which is evaluated too and is the run's result). Work is split into jobs
(member x example, plus the full-cache reference of each example); rank r evaluates jobs r, r+K, ...;
an all-reduce gathers the scores. Every evaluation is deterministic and independent of the rank that runs
it, so 1 and K processes give the same result.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from namm_cache import CacheSpec, NAMMCache
from namm_cache.budgets import FractionBudget, TokenBudget, parse_budget
from namm_cache.calibration import calibrate_normalization
from namm_cache.features import reads_ledger
from namm_cache.hub import ScorerMetadata, save_scorer
from namm_cache.scorers import SCORER_KINDS, build_scorer
from namm_cache.tasks import Example, build_task, token_ids

from .checkpoint import (CHECKPOINT, LEGACY_CHECKPOINT, CheckpointError, RunState, atomic_write_bytes, check_run_folder,
                         locate_checkpoint, read_checkpoint, validated_generation, write_checkpoint)
from .cmaes import CMAES, maximize_with_cma  # noqa: F401  (maximize_with_cma: re-exported)
from .config import EvolutionConfig, check_fits_context, resolve_model_path
from .fitness import evaluate_examples, mean_kept_fraction, normalized_task_scores
from .replay import answer_scores, kept_fraction as replay_fraction, record_prompt, replay_kept

LOG = "log.jsonl"
PLOT = "fitness.png"
SCORER = "scorer"
# What a run writes into its folder; `--overwrite` deletes exactly these before a fresh start.
RUN_FILES = (CHECKPOINT, CHECKPOINT + ".tmp", LEGACY_CHECKPOINT, LOG, LOG + ".tmp", PLOT, "fitness.tmp.png", "config.json", SCORER)


# ---------------------------------------------------------------------------------------- distribution
@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "World":
        """Join the process group torchrun set up (gloo on CPU, nccl on GPU); a single process otherwise."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank=dist.get_rank(), size=dist.get_world_size())

    def broadcast_object(self, value: Any) -> Any:
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


# ------------------------------------------------------------------------------------------- the run
class EvolutionRun:
    """Evolve a NAMM scorer for one model. `run()` continues from `out_dir/checkpoint.safetensors` when resuming."""

    def __init__(self, config: EvolutionConfig, out_dir: str | Path, *, world: World | None = None, progress: bool = True):
        config.validate()
        self.config = config
        self.out_dir = Path(out_dir)
        self.world = world or World()
        self.progress = progress and self.world.is_main
        self.namm_config = config.namm_config()
        self.budget = parse_budget(config.budget)
        torch.set_num_threads(config.threads)
        self.model, self.tokenizer = load_model(config.model)
        window = getattr(self.model.config, "max_position_embeddings", None)  # known now even for a model not converted before
        for stage in config.stages:
            for task in stage.tasks:
                check_fits_context(build_task(task), window if isinstance(window, int) else None, config.model)
        spec = dict(config.scorer)
        kind = spec.pop("kind", "bam")
        self.scorer = build_scorer(kind, input_dim=SCORER_KINDS[kind].input_dim_for(self.namm_config), n_bins=self.namm_config.n_bins, **spec)
        self.dim = self.scorer.num_parameters()
        layer_types = getattr(self.model.config.get_text_config(decoder=True), "layer_types", None) or []
        hybrid = sorted({layer_type for layer_type in layer_types if layer_type != "full_attention"})
        if reads_ledger(self.scorer.extra_inputs) and config.fitness == "replay" and hybrid:
            raise ValueError(f"fitness 'replay' cannot give a {kind} scorer its pooled key norm on {config.model}: its "
                             f"{'/'.join(hybrid)} layers are not recorded. Use fitness: exact, or another scorer kind.")
        self._validation: dict[int, tuple[list[Example], torch.Tensor, dict[str, dict[str, float]]]] = {}

    # --------------------------------------------------------------- state
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def prepare_folder(self, resume: bool, overwrite: bool) -> RunState | None:
        """Check the run folder (see `check_run_folder`) and return the state to resume; a fresh start with
        `overwrite` deletes the previous run's files first. Main rank only."""
        state = check_run_folder(self.out_dir, resume=resume, overwrite=overwrite)
        if state is not None and state.es.dim != self.dim:
            raise CheckpointError(f"{self.checkpoint_path()} evolves {state.es.dim} parameters, but the configured scorer "
                                  f"has {self.dim}; resume with the config the run was started with.")
        if overwrite:
            for name in RUN_FILES:
                target = self.out_dir / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        return state

    def save_state(self, state: RunState) -> None:
        if not self.world.is_main:
            return
        state.numpy_rng = np.random.get_state()
        state.python_rng = random.getstate()
        state.torch_rng = torch.get_rng_state()
        write_checkpoint(self.checkpoint_path(), state)
        atomic_write_bytes(self.out_dir / LOG, "".join(json.dumps(row) + "\n" for row in state.log).encode())
        plot_log(state.log, self.out_dir / PLOT)

    # --------------------------------------------------------------- evaluation
    def examples_for(self, generation: int, stage: int, salt: int = 0) -> list[Example]:
        rng = random.Random(self.config.seed * 1_000_003 + generation * 7919 + salt)
        examples = []
        for spec in self.config.all_tasks(stage):
            examples += build_task(spec).sample(self.tokenizer, rng, self.config.prompts_per_task)
        return examples

    def baseline_budget(self, stage: int) -> int | FractionBudget | TokenBudget | None:
        """The budget baselines run at in `stage`: the run's token or fraction `budget` where it has one (the
        baseline keeps the stage's cap too, so both are held to `min(budget, cap)` as members are), else the
        stage's cap (`max_tokens`) as a token budget, else None (a threshold stage: no baseline matches it)."""
        if isinstance(self.budget, (FractionBudget, TokenBudget)):
            return self.budget
        return self.config.namm_config(stage).max_tokens

    def make_cache(self, vector: np.ndarray | str | None, stage: int) -> Callable[[], NAMMCache]:
        """A cache factory for a member (parameter vector), a baseline policy (by name, at
        `baseline_budget(stage)`) or the full cache (None), under `stage`'s settings."""
        config = self.config.namm_config(stage)
        if vector is None:
            spec = CacheSpec(policy="full", config=config)
        elif isinstance(vector, str):
            # A baseline runs its own rule: the scorer's protected tokens are not part of it.
            budget = self.baseline_budget(stage)
            cap = config.max_tokens if isinstance(budget, (FractionBudget, TokenBudget)) else None  # members' clamp
            own_rule = config.replace(max_tokens=cap).own_rule()
            spec = CacheSpec(policy=vector, budget=budget, config=own_rule)
        else:
            self.scorer.set_flat_params(torch.as_tensor(vector, dtype=torch.float32))
            spec = CacheSpec(scorer=self.scorer, config=config, budget=self.budget)
        return lambda: spec.build(self.model)

    def evaluate_generation(self, members: np.ndarray, examples: list[Example], stage: int) -> dict[str, Any]:
        """Scores of every member (rows of `members`) on `examples` under `stage`'s settings, sharded over ranks.

        With `fitness: exact` a job is one (member or full cache, example) pair; with `fitness: replay` a job is
        one example: one recorded full-cache pass, then every member replayed on it (`evolution/replay.py`)."""
        n_members, n_examples = members.shape[0], len(examples)
        results = torch.zeros(n_members + 1, n_examples, 2, dtype=torch.float64)  # row 0: the full cache
        if self.config.fitness == "replay":
            mine = [e for e in range(n_examples) if e % self.world.size == self.world.rank]
            for e in tqdm(mine, desc="replaying", leave=False, disable=not self.progress):
                results[:, e] = self.replay_example(members, examples[e], stage)
        else:
            jobs = [(m, e) for m in range(-1, n_members) for e in range(n_examples)]  # member -1 = full cache
            mine = [j for j in range(len(jobs)) if j % self.world.size == self.world.rank]
            for j in tqdm(mine, desc="evaluating", leave=False, disable=not self.progress):
                member, example = jobs[j]
                results[member + 1, example] = self.exact_score(None if member < 0 else members[member], examples[example], stage)
        table = self.world.sum(results)
        return self.summarize(table, examples, stage)

    def exact_score(self, vector: np.ndarray | str | None, example: Example, stage: int) -> torch.Tensor:
        """`(score, kept fraction)` of one member (a baseline by name; None: the full cache) on one example,
        through its own cache."""
        make = self.make_cache(vector, stage)
        (result,) = evaluate_examples(self.model, self.tokenizer, [example], make, chunk=self.config.chunk(stage))
        return torch.tensor([result.score, result.kept_fraction], dtype=torch.float64)

    def replay_example(self, members: np.ndarray, example: Example, stage: int) -> torch.Tensor:
        """`(members + 1, 2)` (score, kept fraction) of the full cache (row 0) and every member on `example`."""
        if example.metric != "logprob":  # a generated answer cannot be replayed: evaluate it exactly
            rows = [self.exact_score(None, example, stage)] + [self.exact_score(m, example, stage) for m in members]
            return torch.stack(rows)
        config = self.config.namm_config(stage)
        prompt, answer = token_ids(self.tokenizer, example.prompt), token_ids(self.tokenizer, example.answer)
        recording = record_prompt(self.model, prompt, answer, config, self.config.chunk(stage),
                                  refeed=min(self.config.replay_refeed, prompt.shape[1] - 2))
        recording.prepare(self.scorer, config)
        kept = []
        for vector in members:
            self.scorer.set_flat_params(torch.as_tensor(vector, dtype=torch.float32))
            kept.append(replay_kept(recording, self.scorer, config, self.budget, steps=True))
        # The reference row holds every token: batched with the members it would pad each of them to the whole prompt.
        scores = answer_scores(self.model, recording, [torch.ones_like(kept[0])], config) + answer_scores(self.model, recording, kept, config)
        answer_fed = recording.queries.shape[1]
        fractions = [1.0] + [replay_fraction(k[-1], answer_fed) for k in kept]
        return torch.tensor([scores, fractions], dtype=torch.float64).T

    def summarize(self, table: torch.Tensor, examples: list[Example], stage: int) -> dict[str, Any]:
        """Fitness, quality, kept fraction and per-task scores of each member from the `(members + 1, examples,
        2)` table of (score, kept fraction), row 0 the full cache."""
        from .fitness import ExampleResult

        as_results = lambda row: [ExampleResult(float(s), float(k)) for s, k in row.tolist()]
        full = as_results(table[0])
        fitness, quality, kept, per_task = [], [], [], []
        for m in range(table.shape[0] - 1):
            member = as_results(table[m + 1])
            tasks = normalized_task_scores(member, full, examples)
            q = sum(tasks.values()) / len(tasks)
            k = mean_kept_fraction(member)
            quality.append(q)
            kept.append(k)
            per_task.append(tasks)
            fitness.append(q - self.config.stage_memory_weight(stage) * k)
        return {"fitness": fitness, "quality": quality, "kept": kept, "per_task": per_task,
                "full_scores": [r.score for r in full]}

    # --------------------------------------------------------------- validation
    def validation_examples(self, stage: int) -> list[Example]:
        """The stage's fixed validation set: its tasks, drawn from a generator no training draw uses."""
        rng = random.Random(f"validation/{self.config.seed}/{stage}")
        examples = []
        for spec in self.config.all_tasks(stage):
            examples += build_task(spec).sample(self.tokenizer, rng, self.config.validation_prompts_per_task)
        return examples

    def validate_mean(self, mean: np.ndarray, stage: int) -> dict[str, Any]:
        """The distribution mean scored exactly on the stage's validation set, sharded over ranks. The full
        cache and the `validation_baselines` (at `baseline_budget(stage)`: the run's budget, clamped by the stage's
        cap, else the cap) are scored once per stage and reported beside it (`baselines`: `{policy: {fitness,
        quality, kept, budget_fraction and / or budget_tokens}}`)."""
        if stage not in self._validation:
            examples = self.validation_examples(stage)
            full = self.exact_scores(None, examples, stage)
            baselines = {}
            budget, cap = self.baseline_budget(stage), self.config.namm_config(stage).max_tokens
            at = {"budget_fraction": budget.fraction} if isinstance(budget, FractionBudget) else {}
            tokens = [value for value in (budget.tokens if isinstance(budget, TokenBudget) else None, cap) if value is not None]
            if tokens:
                at["budget_tokens"] = min(tokens)  # a cap clamps a fraction budget: both are reported
            for policy in self.config.validation_baselines if budget is not None else []:
                table = torch.stack([full, self.exact_scores(policy, examples, stage)])
                summary = self.summarize(table, examples, stage)
                baselines[policy] = {"fitness": summary["fitness"][0], "quality": summary["quality"][0],
                                     "kept": summary["kept"][0], **at}
            self._validation = {stage: (examples, full, baselines)}
        examples, full, baselines = self._validation[stage]
        results = self.exact_scores(mean, examples, stage)
        summary = self.summarize(torch.stack([full, results]), examples, stage)
        return {"fitness": summary["fitness"][0], "quality": summary["quality"][0], "kept": summary["kept"][0],
                "per_task": summary["per_task"][0], "prompts": len(examples), **({"baselines": baselines} if baselines else {})}

    def exact_scores(self, member: np.ndarray | str | None, examples: list[Example], stage: int) -> torch.Tensor:
        """`(examples, 2)` (score, kept fraction) of a member (a parameter vector), a baseline policy (by name,
        at `baseline_budget(stage)`) or the full cache (None), each prompt through its own cache;
        sharded over ranks."""
        results = torch.zeros(len(examples), 2, dtype=torch.float64)
        mine = [e for e in range(len(examples)) if e % self.world.size == self.world.rank]
        label = member if isinstance(member, str) else ("full cache" if member is None else "validating")
        for e in tqdm(mine, desc=label, leave=False, disable=not self.progress):
            results[e] = self.exact_score(member, examples[e], stage)
        return self.world.sum(results)

    def validation_due(self, stage_generation: int, stage: int) -> bool:
        """Every `validation_every` generations of a stage, and at its last generation."""
        if not self.config.validation_prompts_per_task:
            return False
        last = stage_generation + 1 == self.config.stages[stage].generations
        return last or (stage_generation + 1) % self.config.validation_every == 0

    # --------------------------------------------------------------- main loop
    def calibrate(self) -> tuple[list[float], list[float]]:
        examples = self.examples_for(generation=-1, stage=0, salt=12345)[: self.config.calibration_prompts]
        sequences = [torch.tensor([self.tokenizer(e.prompt, add_special_tokens=False)["input_ids"]]) for e in examples]
        mean, std = calibrate_normalization(self.model, sequences, config=self.namm_config, chunk_size=self.config.chunk(),
                                            progress=self.progress)
        return mean.tolist(), std.tolist()

    def run(self, resume: bool = False, overwrite: bool = False) -> RunState:
        """Run (or, with `resume`, continue) the evolution. A fresh start refuses a non-empty `out_dir` unless
        `overwrite`; `resume` without a checkpoint is an error."""
        state = None
        if self.world.is_main:
            state = self.prepare_folder(resume, overwrite)
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.world.is_main and state is None:
            np.random.seed(self.config.seed)
            random.seed(self.config.seed)
            torch.manual_seed(self.config.seed)
            if self.config.initial_scorer is not None:  # a warm start: its weights and its statistics
                initial = self.config.load_initial_scorer().scorer
                state = RunState(normalization=(initial.spectrogram_mean.tolist(), initial.spectrogram_std.tolist()))
                mean0 = initial.get_flat_params().double().numpy()
            else:
                state = RunState(normalization=self.calibrate())
                mean0 = np.zeros(self.dim)
            state.es = CMAES(mean0, self.config.sigma0, self.config.population, self.config.seed, self.config.separable)
            (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
            self.save_state(state)
        elif self.world.is_main:
            np.random.set_state(state.numpy_rng)
            random.setstate(state.python_rng)
            torch.set_rng_state(state.torch_rng)
        normalization = self.world.broadcast_object(state.normalization if state else None)
        self.scorer.set_normalization(torch.tensor(normalization[0]), torch.tensor(normalization[1]))
        total = sum(stage.generations for stage in self.config.stages)
        start = self.world.broadcast_object(state.generation if state else None)
        bar = tqdm(total=total, initial=start, desc="generations", disable=not self.progress)
        while True:
            if self.world.is_main and self.advance_stage(state):
                self.save_state(state)  # a resumed run whose config now ends the stage it was in (or adds one)
            position = self.world.broadcast_object((state.generation, state.stage, state.stage_generation) if state else None)
            generation, stage, stage_generation = position
            if generation >= total:
                break
            members = None
            if self.world.is_main:
                solutions = state.es.ask()
                members = np.vstack([solutions, state.es.mean[None, :]])
            members = self.world.broadcast_object(members)
            started, started_cpu = time.time(), time.process_time()
            examples = self.examples_for(generation, stage)
            scores = self.evaluate_generation(members, examples, stage)
            if self.world.is_main:
                population_fitness = scores["fitness"][:-1]
                state.es.tell(members[:-1], population_fitness)
                best = int(np.argmax(population_fitness))
                state.log.append({
                    "generation": generation,
                    "stage": stage,
                    "tasks": [build_task(t).name for t in self.config.all_tasks(stage)],
                    "fitness_best": population_fitness[best],
                    "fitness_mean_population": float(np.mean(population_fitness)),
                    "fitness_distribution_mean": scores["fitness"][-1],
                    "quality_distribution_mean": scores["quality"][-1],
                    "kept_distribution_mean": scores["kept"][-1],
                    "quality_best": scores["quality"][best],
                    "kept_best": scores["kept"][best],
                    "per_task_distribution_mean": scores["per_task"][-1],
                    "sigma": state.es.sigma,
                    "seconds": round(time.time() - started, 2),
                    "cpu_seconds": round(time.process_time() - started_cpu, 2),  # this process's CPU time
                })
            if self.validation_due(stage_generation, stage):
                validation = self.validate_mean(members[-1], stage)
                if self.world.is_main:
                    state.log[-1]["validation"] = validation
                    state.validated[generation] = np.array(members[-1], dtype=np.float64)
            if self.world.is_main:
                state.generation += 1
                state.stage_generation += 1
                self.advance_stage(state)
                self.save_state(state)
            bar.update(1)
        bar.close()
        if self.world.is_main:
            self.export(state)
        return state

    def advance_stage(self, state: RunState) -> bool:
        """Move to the next stage when the current one has run its generations: more tasks (or new settings),
        a fresh CMA-ES warm-started from this stage's distribution mean. Returns whether it moved."""
        if state.stage_generation < self.config.stages[state.stage].generations or state.stage + 1 >= len(self.config.stages):
            return False
        state.stage += 1
        state.stage_generation = 0
        state.es = CMAES(state.es.mean, self.config.sigma0, self.config.population, self.config.seed + state.stage,
                         self.config.separable)
        return True

    def export_checkpoint(self, folder: str | Path | None = None, generation: int | str | None = None) -> Path:
        """Write a scorer of the latest checkpoint without running; safe during a run. `generation`: None for
        the latest distribution mean, an int for the mean validated at that generation, or "best" for the
        validated mean with the highest validation fitness (see `validated_generation`)."""
        state = read_checkpoint(locate_checkpoint(self.out_dir))
        if state.es.dim != self.dim:
            raise CheckpointError(f"{self.checkpoint_path()} evolves {state.es.dim} parameters, but the configured scorer has {self.dim}.")
        self.scorer.set_normalization(torch.tensor(state.normalization[0]), torch.tensor(state.normalization[1]))
        return self.export(state, folder, None if generation is None else validated_generation(state, generation))

    def export(self, state: RunState, folder: str | Path | None = None, generation: int | None = None) -> Path:
        """Write a distribution mean as a scorer folder (config, weights, card, fitness plot; default
        `out_dir/scorer`): the latest, or with `generation` the one validated at that generation (its card
        then describes the run up to that generation)."""
        if generation is None:
            mean, log, stage, done = state.es.mean, state.log, state.stage, state.generation
        else:
            # The mean evaluated (and validated) in generation G: G updates made it, G's own came after.
            mean, log = state.validated[generation], [row for row in state.log if row["generation"] <= generation]
            stage, done = log[-1]["stage"], generation
        self.scorer.set_flat_params(torch.as_tensor(mean, dtype=torch.float32))
        last = log[-1] if log else {}
        weight = self.config.stage_memory_weight(stage)
        tasks = list(dict.fromkeys(name for row in log for name in row["tasks"]))
        chosen = ""
        if generation is not None:
            chosen = (f" Exported: the distribution mean evaluated in generation {generation}, before that generation's "
                      f"update (validation fitness {last['validation']['fitness']:.4f} on {last['validation']['prompts']} "
                      "fixed prompts), not the run's latest.")
        metadata = ScorerMetadata(
            base_models=[name for name in [model_card_name(self.config.model)] if name],
            training_tasks=tasks,
            fitness=last.get("fitness_distribution_mean"),
            description=(
                f"Evolved with CMA-ES (population {self.config.population}, sigma0 {self.config.sigma0}"
                f"{', separable' if self.config.separable else ''}) for {done} generations over "
                f"{len(self.config.stages)} stage(s); fitness = mean over tasks of the score normalised by the full cache"
                f"{f' - {weight} x kept fraction' if weight else ''}. "
                f"The distribution mean {'at the end of the run' if generation is None else 'exported'} kept "
                f"{last.get('kept_distribution_mean', float('nan')):.1%} "
                f"of tokens on the training prompts. `fitness.png` shows the curve.{chosen}"
            ),
            results=[
                {"generation": row["generation"], "fitness (mean)": round(row["fitness_distribution_mean"], 4),
                 "quality": round(row["quality_distribution_mean"], 4), "kept": round(row["kept_distribution_mean"], 4)}
                for row in log[-5:]
            ],
            extra={"evolution_config": self.config.to_dict(), **({"generation": generation} if generation is not None else {})},
        )
        folder = save_scorer(Path(folder) if folder else self.out_dir / SCORER, self.scorer, self.config.namm_config(stage), metadata, repo_id=f"namm-cache/{Path(self.out_dir).name}")
        if (self.out_dir / PLOT).is_file():
            (folder / PLOT).write_bytes((self.out_dir / PLOT).read_bytes())
        return folder


def model_card_name(model: str) -> str | None:
    """The Hub id to record as base_model (None for a local folder, which has no public id)."""
    return {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}.get(model)


def load_model(model: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    if path == model and not Path(path).is_dir():
        from namm_cache.offline import load_offline_model

        return load_offline_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return loaded, tokenizer


def plot_log(log: list[dict[str, Any]], path: Path) -> None:
    """Fitness (best member, population mean, distribution mean and, where run, its validation score), quality
    and kept fraction per generation, with a dotted line where a stage begins (new tasks or settings; the fitness scale may change there)."""
    if not log:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generations = [row["generation"] for row in log]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    top.plot(generations, [row["fitness_best"] for row in log], label="best member")
    top.plot(generations, [row["fitness_mean_population"] for row in log], label="population mean")
    top.plot(generations, [row["fitness_distribution_mean"] for row in log], label="distribution mean", lw=2)
    validated = [row for row in log if "validation" in row]
    if validated:
        prompts = validated[-1]["validation"]["prompts"]
        top.plot([row["generation"] for row in validated], [row["validation"]["fitness"] for row in validated], "o-",
                 color="black", lw=2, label=f"distribution mean, validation\n({prompts} fixed prompts, exact)")
        styles = ["--", "-.", ":", (0, (5, 1))]
        labelled = set()
        for stage in dict.fromkeys(row["stage"] for row in validated):  # each stage's baselines over its own generations
            rows = [row for row in log if row["stage"] == stage]
            last = [row for row in validated if row["stage"] == stage][-1]
            for (policy, baseline), style in zip(last["validation"].get("baselines", {}).items(), styles):
                top.hlines(baseline["fitness"], rows[0]["generation"] - 0.5, rows[-1]["generation"] + 0.5, color="grey",
                           ls=style, lw=1, label=None if policy in labelled else f"{policy}, validation (same budget)")
                labelled.add(policy)
    top.set_ylabel("fitness")
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    quality = [row["quality_distribution_mean"] for row in log]
    bottom.plot(generations, quality, color="tab:purple", label="quality, distribution mean")
    if validated:
        bottom.plot([row["generation"] for row in validated], [row["validation"]["quality"] for row in validated], "o-",
                    color="black", label="quality, validation")
    bottom.plot(generations, [row["kept_distribution_mean"] for row in log], color="tab:green", label="KV kept, distribution mean")
    bottom.plot(generations, [row["kept_best"] for row in log], color="tab:olive", ls="--", label="KV kept, best member")
    bottom.set_ylabel("quality / KV kept")
    bottom.set_xlabel("generation")
    bottom.set_ylim(0, max(1.05, max(quality) + 0.05))
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for previous, row in zip(log, log[1:]):
        if row["stage"] != previous["stage"]:
            for axis in (top, bottom):
                axis.axvline(row["generation"] - 0.5, color="grey", ls=":", lw=1)
            top.annotate(f"stage {row['stage'] + 1}", (row["generation"] - 0.5, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(2, -10), textcoords="offset points", fontsize=7, color="grey")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
