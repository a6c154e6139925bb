"""Run checkpoints as data: one safetensors file whose header carries the run's JSON state.

`OUT/checkpoint.safetensors` holds the arrays (the CMA-ES state's arrays, the random generators' keys) and,
in its metadata, a JSON document with everything else: position in the run, normalisation statistics, the log,
the CMA-ES state tree (see `namm_cache.evolution.cmaes`) and the generators' states. Reading one never imports
or calls anything it names, so a crafted file can at worst be refused; every problem with a file is one
`CheckpointError` naming it. Files are written to a temporary name, fsynced and renamed, so a run killed at
any moment leaves the previous complete checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cmaes import CMAES, StateError

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pkl"  # pickles written before; never loaded (`tools/convert_checkpoint.py` converts)
FORMAT = "namm-evolve-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, crafted, from another format, or for another scorer."""


@dataclass
class RunState:
    """All that a resumed run needs to continue the same trajectory."""

    generation: int = 0
    stage: int = 0
    stage_generation: int = 0
    es: CMAES | None = None
    normalization: tuple[list[float], list[float]] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    numpy_rng: Any = None  # numpy's global generator (pycma draws from it in consistency checks)
    python_rng: Any = None
    torch_rng: Any = None
    # The distribution mean of every validated generation (`validation_every`), so that any of them can be
    # exported later (`namm-evolve --export F --generation G|best`), not only the latest.
    validated: dict[int, np.ndarray] = field(default_factory=dict)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def checkpoint_bytes(state: RunState) -> bytes:
    """The checkpoint file's content for `state` (its generator fields must be filled in)."""
    from safetensors.numpy import save

    tree, es_arrays = state.es.state_dict()
    arrays = {f"es/{name}": array for name, array in es_arrays.items()}
    algorithm, key, position, has_gauss, cached_gaussian = state.numpy_rng
    arrays["numpy_rng/key"] = np.asarray(key, dtype=np.uint32)
    arrays["torch_rng"] = state.torch_rng.numpy().astype(np.uint8)
    for generation, mean in state.validated.items():
        arrays[f"validated/{generation}"] = np.asarray(mean, dtype=np.float64)
    version, internal, gauss_next = state.python_rng
    document = {
        "generation": state.generation,
        "stage": state.stage,
        "stage_generation": state.stage_generation,
        "normalization": [list(state.normalization[0]), list(state.normalization[1])],
        "log": state.log,
        "cma_es": tree,
        "numpy_rng": {"algorithm": algorithm, "position": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
        "python_rng": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    return save(arrays, metadata={"format": FORMAT, "version": str(VERSION), "state": json.dumps(document)})


def write_checkpoint(path: str | Path, state: RunState) -> None:
    atomic_write_bytes(Path(path), checkpoint_bytes(state))


def read_checkpoint(path: str | Path) -> RunState:
    """Load a checkpoint written by `write_checkpoint`. Raises `CheckpointError` (one message naming the file)
    for anything but a complete, consistent checkpoint, and `FileNotFoundError` when there is none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        metadata, arrays = _read_file(path)
    except Exception as error:  # safetensors reports damage with several exception types
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or not a safetensors file: {error}).") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a namm-evolve checkpoint (format {metadata.get('format')!r}).")
    if metadata.get("version") != str(VERSION):
        raise CheckpointError(f"{path} has checkpoint version {metadata.get('version')!r}; this namm-evolve reads version {VERSION}.")
    try:
        document = json.loads(metadata["state"])
        return _state_from(document, arrays)
    except StateError as error:
        raise CheckpointError(f"{path} holds a CMA-ES state that cannot be restored: {error}.") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as error:
        raise CheckpointError(f"{path} is damaged or inconsistent ({type(error).__name__}: {error}).") from None


def _read_file(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:  # one open file: metadata and arrays agree
        metadata = handle.metadata() or {}
        arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    return metadata, arrays


# What the run reads from every log row (resume, export, card and plot).
LOG_KEYS = frozenset({"generation", "stage", "tasks", "fitness_best", "fitness_mean_population", "fitness_distribution_mean",
                      "quality_distribution_mean", "kept_distribution_mean", "kept_best"})


def _count(document: dict[str, Any], name: str) -> int:
    value = document[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _state_from(document: dict[str, Any], arrays: dict[str, np.ndarray]) -> RunState:
    if not isinstance(document, dict):
        raise TypeError("the state is not a JSON object")
    mean, std = document["normalization"]
    for values in (mean, std):
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError("normalization must be two lists of finite numbers")
    if len(mean) != len(std) or not mean or min(std) <= 0:
        raise ValueError("normalization must be a mean and a std of the same length, every std > 0")
    log = document["log"]
    if not isinstance(log, list) or not all(isinstance(row, dict) and LOG_KEYS <= set(row) for row in log):
        raise ValueError(f"log must be a list of objects with the keys {sorted(LOG_KEYS)}")
    es_arrays = {name[len("es/"):]: array for name, array in arrays.items() if name.startswith("es/")}
    es = CMAES.from_state(document["cma_es"], es_arrays)
    numpy_rng = document["numpy_rng"]
    key = arrays["numpy_rng/key"]
    if numpy_rng["algorithm"] != "MT19937" or key.dtype != np.uint32 or key.shape != (624,):
        raise ValueError("numpy_rng is not an MT19937 state")
    numpy_state = ("MT19937", key, _count(numpy_rng, "position"), _count(numpy_rng, "has_gauss"), float(numpy_rng["cached_gaussian"]))
    np.random.RandomState().set_state(numpy_state)  # validates it
    python = document["python_rng"]
    python_state = (python["version"], tuple(python["internal"]), python["gauss_next"])
    random.Random().setstate(python_state)  # validates it
    torch_rng = arrays["torch_rng"]
    if torch_rng.dtype != np.uint8 or torch_rng.ndim != 1:
        raise ValueError("torch_rng must be a byte array")
    torch_state = torch.from_numpy(np.array(torch_rng))
    torch.Generator().set_state(torch_state)  # validates it
    validated = {}  # absent from checkpoints written before validated means were kept
    done = _count(document, "generation")
    for name, array in arrays.items():
        if name.startswith("validated/"):
            number = name[len("validated/"):]
            if not re.fullmatch(r"0|[1-9][0-9]*", number) or int(number) >= done:
                raise ValueError(f"{name!r} names no generation this run has evaluated (0 to {done - 1})")
            generation = int(number)
            if array.dtype != np.float64 or array.shape != (es.dim,) or not np.isfinite(array).all():
                raise ValueError(f"the validated mean of generation {generation} is not {es.dim} finite float64 values")
            validated[generation] = np.array(array)
    return RunState(
        generation=_count(document, "generation"),
        stage=_count(document, "stage"),
        stage_generation=_count(document, "stage_generation"),
        es=es,
        normalization=(mean, std),
        log=log,
        numpy_rng=numpy_state,
        python_rng=python_state,
        torch_rng=torch_state,
        validated=dict(sorted(validated.items())),
    )


def validated_generation(state: RunState, generation: int | str) -> int:
    """The generation whose validated mean `--generation` names: an int whose mean the checkpoint keeps, or
    "best": the highest validation fitness among the kept means of the last stage that has any (each stage has
    its own validation prompts, tasks and memory term, so scores of different stages do not compare; the
    earliest of equals wins). `CheckpointError` when there is none to choose."""
    rows = {row["generation"]: row for row in state.log if "validation" in row and row["generation"] in state.validated}
    if not rows:
        raise CheckpointError("this checkpoint keeps no validated means (written before they were kept, or no "
                              "validation ran yet); export the latest mean without --generation.")
    if generation == "best":
        stage = max(row["stage"] for row in rows.values())
        fitness = {g: row["validation"]["fitness"] for g, row in rows.items() if row["stage"] == stage}
        return max(fitness, key=lambda g: (fitness[g], -g))
    if generation not in rows:
        raise CheckpointError(f"generation {generation} has no validated mean in this checkpoint; kept: "
                              f"{', '.join(str(g) for g in sorted(rows))} (or 'best').")
    return int(generation)


def unkept_validations(state: RunState) -> list[int]:
    """Validated generations whose mean the checkpoint does not keep (validated before means were kept)."""
    return [row["generation"] for row in state.log if "validation" in row and row["generation"] not in state.validated]


def locate_checkpoint(out_dir: str | Path, hint: str = "") -> Path:
    """The checkpoint file of run folder `out_dir`; `FileNotFoundError` naming the folder when it has none
    (`hint` is appended), `CheckpointError` when it has only a pickle from an older version."""
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINT).is_file():
        return out_dir / CHECKPOINT
    if (out_dir / LEGACY_CHECKPOINT).is_file():
        raise CheckpointError(
            f"{out_dir} holds only an old pickle checkpoint ({LEGACY_CHECKPOINT}), which is never loaded because unpickling "
            f"can run code; if you trust it, convert it with `python tools/convert_checkpoint.py --config CONFIG --out {out_dir}`."
        )
    where = f"folder {out_dir} does not exist" if not out_dir.exists() else f"no {CHECKPOINT} in {out_dir}"
    raise FileNotFoundError(f"There is no checkpoint to read ({where})" + (f"; {hint}." if hint else "."))


def check_run_folder(out_dir: str | Path, *, resume: bool, overwrite: bool = False) -> RunState | None:
    """What a run may do with `out_dir`, checked before any work. Returns the checkpoint to resume, or None.

    - `resume`: `out_dir` must hold a readable checkpoint; none is an error naming the folder.
    - otherwise `out_dir` must be absent or empty: a fresh start never overwrites a run folder, unless
      `overwrite` (the run then deletes its own files there before it begins; see `RUN_FILES`).
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run in OUT, or start it over.")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file, not a run folder.")
    if resume:
        return read_checkpoint(locate_checkpoint(out_dir, "start a new run without --resume"))
    if out_dir.is_dir() and not overwrite:
        present = sorted(entry.name for entry in out_dir.iterdir())
        if present:
            shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise FileExistsError(f"{out_dir} is not empty ({shown}); pass --resume to continue the run in it, "
                                  "--overwrite to start it over (its run files are deleted), or choose another --out.")
    return None
