"""BAM: the backward attention memory scorer of the NAMM paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Scorer, check_hidden_dim, zero_linear


class BAMScorer(Scorer):
    """Backward-masked single-head self-attention over a layer's tokens, then a gated linear read-out.

    For features `x` (one row per token, chronological by position):
        `a = Attention(x)` with queries/keys/values `input_dim -> hidden_dim` (bias, no RoPE) and a backward
        mask: token i attends to itself and to newer tokens only (position_j >= position_i);
        `[res, mult] = Linear(hidden_dim -> 2 * input_dim)(a)`; `h = x * (1 + mult) + res`;
        `score = Linear(input_dim -> 1)(h)`.
    At the paper's sizes (25 features, hidden 32) that is 4,172 parameters. All parameters start at zero,
    so every score is 0 and, with the default threshold 0, every token is kept.
    """

    kind = "bam"

    def __init__(self, input_dim: int = 25, hidden_dim: int = 32, n_bins: int = 17):
        super().__init__(input_dim=input_dim, n_bins=n_bins)
        hidden_dim = check_hidden_dim(hidden_dim)
        self.hidden_dim = hidden_dim
        self.query = zero_linear(self.input_dim, hidden_dim)
        self.key = zero_linear(self.input_dim, hidden_dim)
        self.value = zero_linear(self.input_dim, hidden_dim)
        self.gates = zero_linear(hidden_dim, 2 * self.input_dim)
        self.readout = zero_linear(self.input_dim, 1)

    def score_tokens(self, features: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = features.to(self.readout.weight.dtype)
        # Newest real token first, empty slots last: "attend to itself and newer tokens" becomes a causal mask
        # in that order, which the fused (flash) attention kernels run without building an S x S mask.
        # An empty slot then attends to real tokens too; its score is ignored, and no real token sees it.
        newest_first = torch.where(valid, -positions, torch.full_like(positions, torch.iinfo(positions.dtype).max))
        order = newest_first.argsort(dim=-1, stable=True)
        index = order.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        ordered = x.gather(-2, index).unsqueeze(-3)  # (N, 1, S, F): one attention head
        attended = F.scaled_dot_product_attention(self.query(ordered), self.key(ordered), self.value(ordered), is_causal=True)
        attended = torch.empty_like(attended).scatter_(-2, order.unsqueeze(-2).unsqueeze(-1).expand_as(attended), attended)
        residual, multiplier = self.gates(attended.squeeze(-3)).chunk(2, dim=-1)
        hidden = x * (1 + multiplier) + residual
        return self.readout(hidden).squeeze(-1)

    def config_dict(self) -> dict:
        return {**super().config_dict(), "hidden_dim": self.hidden_dim}


class BAMNormsScorer(BAMScorer):
    """BAM that also reads each token's key and value norms (log L2 norm, z-scored within its layer and head:
    `namm_cache.features.norm_features`) after the paper's features: 27 inputs at the paper's sizes.

    Attention statistics see only where queries looked so far; on prompts whose question comes last, a norm
    can flag a token (a needle's digits, an unusual word) before any query has looked at it."""

    kind = "bam_norms"
    extra_inputs = ("key_norm", "value_norm")

    def __init__(self, input_dim: int = 27, hidden_dim: int = 32, n_bins: int = 17):
        super().__init__(input_dim=input_dim, hidden_dim=hidden_dim, n_bins=n_bins)
