"""MLP scorer: the BAM read-out without the attention block (each token scored on its own features)."""

from __future__ import annotations

import torch

from .base import Scorer, check_hidden_dim, zero_linear


class MLPScorer(Scorer):
    """`[res, mult] = Linear(hidden -> 2*input)(ReLU(Linear(input -> hidden)(x)))`; `h = x*(1+mult)+res`;
    `score = Linear(input -> 1)(h)`. Zero-initialised: every score is 0 (keep everything)."""

    kind = "mlp"

    def __init__(self, input_dim: int = 25, hidden_dim: int = 32, n_bins: int = 17):
        super().__init__(input_dim=input_dim, n_bins=n_bins)
        hidden_dim = check_hidden_dim(hidden_dim)
        self.hidden_dim = hidden_dim
        self.hidden = zero_linear(self.input_dim, hidden_dim)
        self.gates = zero_linear(hidden_dim, 2 * self.input_dim)
        self.readout = zero_linear(self.input_dim, 1)

    def score_tokens(self, features: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = features.to(self.readout.weight.dtype)
        residual, multiplier = self.gates(torch.relu(self.hidden(x))).chunk(2, dim=-1)
        hidden = x * (1 + multiplier) + residual
        return self.readout(hidden).squeeze(-1)

    def config_dict(self) -> dict:
        return {**super().config_dict(), "hidden_dim": self.hidden_dim}
