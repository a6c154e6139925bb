"""Opt-in wall-clock timers for the phases of a NAMM cache: off by default, a no-op when off.

    from namm_cache.profiling import profile_phases
    with profile_phases() as phases:
        model.generate(..., cache=cache)
    phases.seconds   # {"attention": 1.9, "mask": 0.1, "observe": 0.4, "score": 0.3, ...}

The phases do not nest, so their times add up; whatever the model does outside them (projections,
MLPs, norms, the Python of its forward) is the rest of the wall time. On CUDA every phase boundary
synchronises the device while profiling, so the times are the device's, not the launch's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

# What each phase covers (benchmarks/profile_observation.py prints these).
PHASES = {
    "attention": "the attention kernel of each NAMM layer (eager with probabilities when observing, else the model's own)",
    "mask": "the additive mask each NAMM layer builds over its kept slots",
    "bookkeeping": "padding flags, position checks, eviction-point arithmetic of each chunk",
    "observe": "GQA averaging of the probabilities and folding them into each token's statistics (STFT, EMA, sums)",
    "append": "appending the chunk's keys, values and per-token state to storage",
    "score": "building the observation and the policy's scores (features + scorer for NAMM)",
    "select": "scores to kept tokens (threshold, budget, newest-token rule)",
    "compact": "gathering the kept slots of every per-token tensor",
}


@dataclass
class PhaseTimes:
    """Accumulated seconds and call counts per phase."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class _NoPhase:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_PHASE = _NoPhase()
_active: PhaseTimes | None = None
_synchronize = False


class _Phase:
    __slots__ = ("name", "start")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        if _synchronize:
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if _synchronize:
            torch.cuda.synchronize()
        if _active is not None:
            _active.seconds[self.name] += time.perf_counter() - self.start
            _active.calls[self.name] += 1


def phase(name: str) -> _Phase | _NoPhase:
    """A context manager timing `name` while `profile_phases` is active, else a shared no-op."""
    return _NO_PHASE if _active is None else _Phase(name)


@contextmanager
def profile_phases(synchronize_cuda: bool | None = None) -> Iterator[PhaseTimes]:
    """Collect phase times of every NAMM cache used inside the block (not re-entrant)."""
    global _active, _synchronize
    if _active is not None:
        raise RuntimeError("profile_phases() is already active.")
    times = PhaseTimes()
    _active = times
    _synchronize = torch.cuda.is_available() if synchronize_cuda is None else synchronize_cuda
    try:
        yield times
    finally:
        _active = None
        _synchronize = False
