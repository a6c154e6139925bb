"""MLP scorer: the BAM read-out without the attention block (each token scored on its own features)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Scorer


class MLPScorer(Scorer):
    """`[res, mult] = Linear(hidden -> 2*input)(ReLU(Linear(input -> hidden)(x)))`; `h = x*(1+mult)+res`;
    `score = Linear(input -> 1)(h)`. Zero-initialised: every score is 0 (keep everything)."""

    kind = "mlp"

    def __init__(self, input_dim: int = 25, hidden_dim: int = 32, n_bins: int = 17):
        super().__init__(input_dim=input_dim, n_bins=n_bins)
        if hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be positive, got {hidden_dim}.")
        self.hidden_dim = hidden_dim
        self.hidden = nn.Linear(input_dim, hidden_dim)
        self.gates = nn.Linear(hidden_dim, 2 * input_dim)
        self.readout = nn.Linear(input_dim, 1)
        for parameter in self.parameters():
            nn.init.zeros_(parameter)

    def score_tokens(self, features: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = features.to(self.readout.weight.dtype)
        residual, multiplier = self.gates(torch.relu(self.hidden(x))).chunk(2, dim=-1)
        hidden = x * (1 + multiplier) + residual
        return self.readout(hidden).squeeze(-1)

    def config_dict(self) -> dict:
        return {**super().config_dict(), "hidden_dim": self.hidden_dim}
