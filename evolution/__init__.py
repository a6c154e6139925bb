"""Evolve NAMM scorers with CMA-ES: tasks, fitness, a resumable and distributed loop, and the `namm-evolve` CLI."""

from .config import EvolutionConfig, Stage
from .run import CMAES, EvolutionRun, World

__all__ = ["EvolutionConfig", "Stage", "EvolutionRun", "CMAES", "World"]
