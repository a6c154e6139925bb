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
        queries, keys, values = self.query(x), self.key(x), self.value(x)
        allowed = (positions.unsqueeze(-1) <= positions.unsqueeze(-2)) & valid.unsqueeze(-2)
        # A slot with no token still attends to itself, so no row is empty (its score is ignored).
        allowed |= torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed)
        residual, multiplier = self.gates(attended).chunk(2, dim=-1)
        hidden = x * (1 + multiplier) + residual
        return self.readout(hidden).squeeze(-1)

    def config_dict(self) -> dict:
        return {**super().config_dict(), "hidden_dim": self.hidden_dim}
