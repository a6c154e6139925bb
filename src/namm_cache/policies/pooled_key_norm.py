"""Pooled key norm: keep the tokens whose keys are quietest across every layer (this project's rule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Observation, Policy


@dataclass(frozen=True)
class PooledKeyNormPolicy(Policy):
    """Key-norm eviction with one score per token shared by every layer and KV head: each (layer, KV head)
    row's log key norm z-scored over the tokens it has seen, averaged over the rows that have seen the token
    (`namm_cache.ledger.KeyNormLedger.pooled_all_layers`); the lowest are kept.

    Not a published method: it is the input `linear_all_layers` scorers read, run as a rule, so a NAMM scorer
    can be compared with what that input gives alone. One head's key norm (`key_norm`) flags a few heads'
    important tokens; pooled over SmolLM2's 90 rows it flags them for every head. Needs no attention; the
    cache keeps a ledger of every layer's key norms for it (`stats()["state_bytes"]`). Rounds between prefill
    chunks read every layer; a round inside a chunk reads, for that chunk's tokens, layers up to its own.
    """

    name = "pooled_key_norm"
    reads_pooled_key_norm = True
    pools_every_layer = True

    def score(self, observation: Observation) -> torch.Tensor:
        return -observation.pooled_key_norm.to(torch.float32)
