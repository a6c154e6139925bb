"""Eviction policies behind one contract: `score(observation) -> (N, S)`, higher = keep."""

from .base import Observation, Policy
from .namm import NAMMPolicy

__all__ = ["Observation", "Policy", "NAMMPolicy"]
