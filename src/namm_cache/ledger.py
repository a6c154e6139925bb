"""A token-level key-norm signal shared by every layer: the pooled key norm a scorer can read.

One (layer, KV head)'s key norm says little about whether a token matters (needle vs haystack AUC 0.72
on SmolLM2, averaged over its 90 heads); each head's z-scored log key norm averaged over a layer's 3 heads
scores 0.78, and over all 90 rows 0.92 (`benchmarks/needle_features.py`). A layer alone cannot compute it:
it needs the other layers' keys of tokens it may have evicted. `KeyNormLedger` keeps, for every batch
row, each cache layer's log key norm per KV head and token seen (sliding-window layers included: they see
every token; a layer that stores no keys of its own, such as one sharing another's, adds nothing), and
computes the pooled value a NAMM layer reads at its eviction round.

Definition (shared with the replay fitness through `pooled_key_norm`): at a round of layer `l` at position
`now`, every (layer, head) row of the layers `0..l` is z-scored over the real tokens at positions
`<= now`, and the pooled value of a token is the mean of its z-scores over those rows. Only layers up to
`l` are read and only tokens up to `now`, so the value does not depend on how the prompt was chunked (a
round inside a chunk sees exactly what it would see between chunks). The last layer reads all rows (the
0.92 above); the first reads its own heads only.

Every layer (`pooled_all_layers`, read by the `pooled_key_norm` policy and `linear_all_layers` scorers): each
token's value is the mean of its z-scores over every row that has seen it, each row z-scored over the real
tokens it has seen up to `now`. Rounds between chunks (and in decoding) read every layer for every token;
a round inside a chunk runs before the later layers have seen that chunk, so this value depends on the
chunking, and a left-padded batch (whose rows' rounds fall inside chunks) is refused by those policies.

Cost: one float32 per (layer, KV head) and token seen, per batch row, in storage that doubles when full
(so up to twice that is allocated): for SmolLM2, 360 bytes per token against 23 KB per token of a
bfloat16 full cache (1.6%). It grows with the tokens seen, evicted or not.
"""

from __future__ import annotations

import torch

from .features import standardize_rows


def pooled_key_norm(log_key_norms: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The mean over rows of each row's z-scored log key norm.

    Args:
        log_key_norms: `(..., R, T)` log L2 norm of each token's key, one row per (layer, KV head).
        real: `(..., T)` bool, the tokens the statistics run over (real tokens up to the round's position).

    Returns:
        `(..., T)`: per token, the mean over the `R` rows of `(x - mean_row) / std_row`, moments taken over
        the `real` tokens; 0 where `real` is False.
    """
    return z_scored_rows(log_key_norms, real).mean(-2)


def z_scored_rows(log_key_norms: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """`(..., R, T)`: each row z-scored over the `real` `(..., T)` tokens (`features.standardize_rows`), 0 elsewhere."""
    valid = real.unsqueeze(-2).expand_as(log_key_norms).reshape(-1, log_key_norms.shape[-1])
    return standardize_rows(log_key_norms.reshape(-1, log_key_norms.shape[-1], 1), valid).view(log_key_norms.shape)


class KeyNormLedger:
    """Per batch row, the log key norm of every token seen in every cache layer (see the module docstring).

    Storage: `norms[layer]` `(B, H_layer, capacity)` float32, filled up to `lengths[layer]` columns;
    `real` `(B, capacity)` bool, False at padding positions. Column = absolute position in the (padded)
    sequence, as `NAMMLayer.positions` counts it. Capacity doubles when full, so appending a decoding step
    does not copy the whole history.
    """

    def __init__(self) -> None:
        self.norms: dict[int, torch.Tensor] = {}
        self.lengths: dict[int, int] = {}
        self.real: torch.Tensor | None = None
        # The last `pooled_all_layers` result and what it read: at rounds between chunks every layer reads the
        # same value, so one round of a model computes it once instead of once per layer.
        self._all_layers: tuple[tuple, torch.Tensor] | None = None

    def reset(self) -> None:
        self.norms, self.lengths, self.real, self._all_layers = {}, {}, None, None

    def append(self, layer_idx: int, key_states: torch.Tensor) -> None:
        """Add the log key norms of the chunk `key_states` `(B, H, q, D)` that layer `layer_idx` just received."""
        batch, heads, q, _ = key_states.shape
        values = key_states.detach().float().norm(dim=-1).clamp_min(1e-12).log()
        if self.real is not None:
            if batch != self.real.shape[0]:
                raise ValueError(f"Batch size changed from {self.real.shape[0]} to {batch}; call cache.reset() before a new batch.")
            values = values.to(self.real.device)  # one device for every layer's rows (a model split over devices)
        length = self.lengths.get(layer_idx, 0)
        stored = self.norms.get(layer_idx)
        if stored is None or length + q > stored.shape[-1]:
            grown = values.new_zeros(batch, heads, max(2 * (length + q), 256))
            if stored is not None:
                grown[..., :length] = stored[..., :length]
            stored = self.norms[layer_idx] = grown
        stored[..., length:length + q] = values
        self.lengths[layer_idx] = length + q
        real = self.real
        if real is None or length + q > real.shape[-1]:
            grown_real = torch.ones(batch, max(2 * (length + q), 256), dtype=torch.bool, device=values.device)
            if real is not None:
                grown_real[:, : real.shape[-1]] = real
            self.real = grown_real

    def mark_padding(self, start: int, is_padding: torch.Tensor) -> None:
        """Flag padding tokens `(B, q)` at positions `start .. start + q - 1`: they count in no statistic."""
        self.real[:, start:start + is_padding.shape[-1]] &= ~is_padding.to(self.real.device)
        if self._all_layers is not None and start <= self._all_layers[0][0]:
            self._all_layers = None

    def pooled(self, rows: torch.Tensor, now: int, up_to_layer: int) -> torch.Tensor:
        """`(len(rows), now + 1)`: `pooled_key_norm` of batch `rows` over the layers `<= up_to_layer`, for the
        tokens at positions `0 .. now` (0 at padding positions)."""
        layers = [layer for layer in sorted(self.norms) if layer <= up_to_layer]
        missing = [layer for layer in layers if self.lengths[layer] <= now]
        if up_to_layer not in self.norms or missing:
            raise RuntimeError(f"The key-norm ledger has no keys up to position {now} for layer(s) {missing or [up_to_layer]}: "
                               "the cache must record every layer's keys before a layer scores.")
        index = rows.to(self.real.device)
        norms = torch.cat([self.norms[layer][..., : now + 1].index_select(0, index) for layer in layers], dim=1)
        return pooled_key_norm(norms, self.real[:, : now + 1].index_select(0, index))

    def pooled_all_layers(self, rows: torch.Tensor, now: int) -> torch.Tensor:
        """`(len(rows), now + 1)`: the key norm of batch `rows` pooled over every layer, at a round at position
        `now`: each (layer, KV head) row recorded so far is z-scored over the real tokens it has seen up to
        `now`, and each token's value is the mean of its z-scores over the rows that have seen it (0 at padding
        positions).

        A round whose point ends a chunk runs when the next chunk reaches the layer: every layer has seen every
        token up to `now`. At a round inside a chunk, the layers after `l` have seen the tokens before the chunk
        only: those tokens get every layer's rows, the chunk's own the rows of layers `0..l`. The value therefore
        depends on the chunking (`evolution.replay.replay_pooled_all_layers` reproduces it for a given chunk)."""
        index = rows.to(self.real.device)
        seen_by_layer = tuple((layer, min(self.lengths[layer], now + 1)) for layer in sorted(self.norms))
        key = (now, seen_by_layer, tuple(index.tolist()))
        if self._all_layers is not None and self._all_layers[0] == key:
            return self._all_layers[1]
        real = self.real[:, : now + 1].index_select(0, index)
        total = torch.zeros(real.shape, dtype=torch.float32, device=real.device)
        count = torch.zeros(now + 1, dtype=torch.float32, device=real.device)
        for layer, seen in seen_by_layer:
            if seen == 0:
                continue
            norms = self.norms[layer][..., :seen].index_select(0, index)
            total[:, :seen] += z_scored_rows(norms, real[:, :seen]).sum(-2)
            count[:seen] += norms.shape[-2]
        if not bool((count > 0).all()):
            raise RuntimeError(f"The key-norm ledger has no keys up to position {now}: the cache must record every layer's "
                               "keys before a layer scores.")
        value = total / count
        self._all_layers = (key, value)
        return value

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam reordering, repeat-interleave, batch selection)."""
        if self.real is None:
            return
        index = index.to(self.real.device)
        self._all_layers = None
        self.norms = {layer: tensor.index_select(0, index) for layer, tensor in self.norms.items()}
        self.real = self.real.index_select(0, index)

    def nbytes(self) -> int:
        """Bytes allocated (reserved columns included)."""
        return sum(tensor.nbytes for tensor in self.norms.values()) + (self.real.nbytes if self.real is not None else 0)
