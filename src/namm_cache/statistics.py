"""Per-token statistics a NAMM layer tracks from the attention it observes, one small class each.

A policy declares the statistics it reads (`needs = frozenset({"attention_sum"})`); the layer builds one
`Statistic` per name and treats them all alike: it allocates their per-token tensors, folds every observed
attention step into them, moves their tensors with the kept slots (append, compaction, batch reorder) and
drops them on reset. At scoring time the policy reads each one by name:
`observation.statistics["attention_sum"]`.

Adding a statistic is one class here or in your own module:

    @register_statistic
    class AttentionSquares(Statistic):
        name = "attention_squares"  # one float per token (override `trailing_shapes` for more)

        def fold(self, step):  # step.probabilities: (B, H, q, S); step.real: (B, q) real queries
            weight = step.real.to(step.probabilities.dtype)[:, None, :, None]
            self.tensors["attention_squares"] += (step.probabilities.square() * weight).sum(2)

A policy that needs a name nobody registered is refused when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch

from .config import NAMMConfig
from .features import SpectrogramState, fold_attention


@dataclass
class AttentionStep:
    """One segment of consecutive queries, as the statistics see it.

    Attributes:
        probabilities: `(B, H, q, S)` float32 post-softmax attention over the stored slots, averaged over
            the query heads of each KV head.
        real_queries: `(B, q)` bool, False for padding queries; None when every query is real.
        real_tokens_seen: per batch row, real queries seen before this step.
        next_eviction: per batch row, the real-token count at which the row evicts next.
    """

    probabilities: torch.Tensor
    real_queries: torch.Tensor | None
    real_tokens_seen: list[int]
    next_eviction: list[int]

    @cached_property
    def real(self) -> torch.Tensor:
        """`(B, q)` bool, True for real (non-padding) queries."""
        if self.real_queries is not None:
            return self.real_queries
        batch, _, q, _ = self.probabilities.shape
        return torch.ones(batch, q, dtype=torch.bool, device=self.probabilities.device)


class Statistic:
    """A per-token statistic of one layer, folded from observed attention.

    Class attributes:
        name: the name policies declare in `needs` and read from `observation.statistics`.
        value_tensor: which of its tensors the observation carries (default: the one named `name`).

    Attributes:
        tensors: `{tensor name: (B, H, S, *trailing)}`, one entry per slot of the layer's storage, in the
            same slot order; the layer moves them with the slots. Empty until `allocate`.
    """

    name: ClassVar[str] = ""
    value_tensor: ClassVar[str | None] = None

    def __init__(self, policy: Any, config: NAMMConfig):
        self.config = config
        self.tensors: dict[str, torch.Tensor] = {}
        self._rooms: dict[str, torch.Tensor] = {}  # zeroed tensors with free slots, `tensors` are views of them

    @classmethod
    def check_policy(cls, policy: Any) -> None:
        """Raise `ValueError` if `policy` lacks a setting this statistic reads (called when the policy is built)."""

    def trailing_shapes(self) -> dict[str, tuple[int, ...]]:
        """What it allocates per token: `{tensor name: trailing shape}` (default: one float per token)."""
        return {self.name: ()}

    def allocate(self, batch: int, heads: int, slots: int, device: torch.device) -> None:
        """Zero state for every slot and batch row (tokens are observed from now on); also the reset."""
        self.tensors = {name: torch.zeros(batch, heads, slots, *shape, device=device) for name, shape in self.trailing_shapes().items()}
        self._rooms = {}

    def append(self, q: int, ahead: int) -> None:
        """Give every tensor `q` zero slots at the end (the tokens just appended to the layer).

        The slots come from a zeroed room of `max(q, ahead)` free slots (`ahead`: tokens until the layer's next
        eviction round), so most appends allocate and copy nothing; a tensor that a fold or the layer replaced
        since (no longer a view of its room) gets a new room."""
        for name, tensor in self.tensors.items():
            slots = tensor.shape[2]
            room = self._rooms.get(name)
            if room is None or room.shape[2] < slots + q or not _is_prefix(tensor, room):
                room = tensor.new_zeros(tensor.shape[0], tensor.shape[1], slots + max(q, ahead), *tensor.shape[3:])
                room[:, :, :slots] = tensor
                self._rooms[name] = room
            self.tensors[name] = room[:, :, : slots + q]

    def allocated_bytes(self) -> int:
        """Bytes of the per-token state, reserved free slots included."""
        total = 0
        for name, tensor in self.tensors.items():
            room = self._rooms.get(name)
            total += room.nbytes if room is not None and _is_prefix(tensor, room) else tensor.nbytes
        return total

    def drop_rooms(self) -> None:
        """Forget the rooms (the layer replaced every tensor, e.g. compaction), so their memory is freed."""
        self._rooms = {}

    @property
    def allocated(self) -> bool:
        return bool(self.tensors)

    def clear(self) -> None:
        """Drop all state (the layer was reset); `allocate` starts it again."""
        self.tensors = {}
        self._rooms = {}

    def fold(self, step: AttentionStep) -> None:
        """Fold the attention of `step`'s queries into the per-token state."""
        raise NotImplementedError

    def evicted(self, rows: torch.Tensor) -> None:
        """Batch `rows` just ran an eviction round (before compaction)."""

    def select_rows(self, rows: list[int]) -> None:
        """Per-row state other than `tensors` follows a batch reorder / selection (`tensors` are moved by the layer)."""

    def value(self, rows: torch.Tensor, heads: int, slots: int) -> torch.Tensor:
        """`(len(rows) * heads, slots, *trailing)`: what a policy reads for batch `rows` (one row per (batch
        row, KV head)); zeros while nothing was observed (the layer allocates on the first observation)."""
        name = self.value_tensor or self.name
        if name not in self.tensors:
            return torch.zeros(len(rows) * heads, slots, *self.trailing_shapes()[name], device=rows.device)
        tensor = self.tensors[name]
        return tensor[rows].reshape(-1, slots, *tensor.shape[3:])


def _is_prefix(view: torch.Tensor, room: torch.Tensor) -> bool:
    """Whether `view` is `room[:, :, :n]` for its own `n` (same memory, start, shape and strides but the slot count)."""
    return (view.data_ptr() == room.data_ptr() and view.shape[:2] == room.shape[:2] and view.shape[3:] == room.shape[3:]
            and view.stride() == room.stride() and view.storage_offset() == room.storage_offset())


STATISTICS: dict[str, type[Statistic]] = {}


def register_statistic(cls: type[Statistic]) -> type[Statistic]:
    """Class decorator: make `cls` available to policies under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`.")
    STATISTICS[cls.name] = cls
    return cls


def check_needs(policy: Any) -> None:
    """Refuse a policy that needs a statistic nobody registered (or lacks a setting one reads)."""
    needs = getattr(policy, "needs", frozenset())
    unknown = sorted(set(needs) - set(STATISTICS))
    if unknown:
        raise ValueError(
            f"Policy {type(policy).__name__} needs unknown statistic(s) {unknown}; known: {sorted(STATISTICS)}. "
            "Add one with @namm_cache.statistics.register_statistic on a Statistic subclass."
        )
    for name in needs:
        STATISTICS[name].check_policy(policy)


def build_statistics(policy: Any, config: NAMMConfig) -> dict[str, Statistic]:
    """One unallocated `Statistic` per name the policy needs, in a stable order."""
    check_needs(policy)
    return {name: STATISTICS[name](policy, config) for name in sorted(policy.needs)}


@register_statistic
class Spectrogram(Statistic):
    """NAMM: EMA of the magnitude STFT of each token's attention time series (see `features.fold_attention`).

    Per token: `ema (n_bins)`, `tail (hop)` and `pending (hop)`; per batch row: how many pending values
    its series hold (rows of a padded batch see different numbers of real queries).
    """

    name = "spectrogram"
    value_tensor = "ema"

    def trailing_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"ema": (self.config.n_bins,), "tail": (self.config.hop_length,), "pending": (self.config.hop_length,)}

    def allocate(self, batch: int, heads: int, slots: int, device: torch.device) -> None:
        super().allocate(batch, heads, slots, device)
        self.pending_count = [0] * batch

    def select_rows(self, rows: list[int]) -> None:
        self.pending_count = [self.pending_count[i] for i in rows]

    def fold(self, step: AttentionStep) -> None:
        probabilities, real_queries = step.probabilities, step.real_queries
        batch, _, q, _ = probabilities.shape
        if (real_queries is None or bool(real_queries.all())) and len(set(self.pending_count)) == 1:
            self._fold_rows(None, probabilities.transpose(-1, -2))
            return
        for b in range(batch):
            rows = real_queries[b] if real_queries is not None else torch.ones(q, dtype=torch.bool, device=probabilities.device)
            if bool(rows.any()):
                self._fold_rows([b], probabilities[b : b + 1][:, :, rows].transpose(-1, -2))

    def _fold_rows(self, rows: list[int] | None, values: torch.Tensor) -> None:
        """Fold `values` `(len(rows), H, S, q)` (any strides) into the state of batch `rows` (all rows if None)."""
        tensors = self.tensors
        count, q = self.pending_count[0 if rows is None else rows[0]], values.shape[-1]
        if rows is None and count + q < self.config.hop_length:
            # No frame completes (most decode steps): the values wait in `pending`, written in place. This is what
            # `fold_attention` returns, since a slot's pending values past `count` are always zero.
            tensors["pending"][..., count : count + q] = values
            self.pending_count = [count + q] * len(self.pending_count)
            return
        index = slice(None) if rows is None else torch.tensor(rows, device=tensors["ema"].device)
        state = SpectrogramState(
            ema=tensors["ema"][index],
            tail=tensors["tail"][index],
            pending=tensors["pending"][index],
            pending_count=self.pending_count[0 if rows is None else rows[0]],
        )
        state = fold_attention(state, values, self.config)
        if rows is None:
            tensors.update(ema=state.ema, tail=state.tail, pending=state.pending)
            self.drop_rooms()  # the new tensors back nothing reserved: free the old rooms now
        else:
            tensors["ema"][index] = state.ema
            tensors["tail"][index] = state.tail
            tensors["pending"][index] = state.pending
        for b in range(len(self.pending_count)) if rows is None else rows:
            self.pending_count[b] = state.pending_count


@register_statistic
class AttentionSum(Statistic):
    """H2O: attention each token received, summed over every real query since it arrived."""

    name = "attention_sum"

    def fold(self, step: AttentionStep) -> None:
        weight = step.real.to(step.probabilities.dtype)[:, None, :, None]
        self.tensors[self.name] += (step.probabilities * weight).sum(2)


@register_statistic
class LastAttention(Statistic):
    """TOVA: attention from the newest real query of each row."""

    name = "last_attention"

    def fold(self, step: AttentionStep) -> None:
        real, tensor = step.real, self.tensors[self.name]
        for b in range(real.shape[0]):
            indices = real[b].nonzero()
            if len(indices):
                tensor[b] = step.probabilities[b, :, int(indices[-1])]


@register_statistic
class WindowAttention(Statistic):
    """SnapKV: attention summed over the last `policy.window` real queries before each eviction point;
    reset when the row evicts (a new observation window starts)."""

    name = "window_attention"

    def __init__(self, policy: Any, config: NAMMConfig):
        super().__init__(policy, config)
        self.window = policy.window

    @classmethod
    def check_policy(cls, policy: Any) -> None:
        window = getattr(policy, "window", None)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"Policy {type(policy).__name__} needs 'window_attention', so it must have an integer `window` >= 1.")

    def fold(self, step: AttentionStep) -> None:
        # Query number r (1-based, real queries of the row) is in the observation window of the row's next
        # eviction point E iff E - window < r <= E.
        device = step.probabilities.device
        real = step.real
        number = torch.tensor(step.real_tokens_seen, device=device).unsqueeze(-1) + real.cumsum(-1)
        point = torch.tensor(step.next_eviction, device=device).unsqueeze(-1)
        in_window = real & (number > point - self.window) & (number <= point)
        self.tensors[self.name] += (step.probabilities * in_window.to(step.probabilities.dtype)[:, None, :, None]).sum(2)

    def evicted(self, rows: torch.Tensor) -> None:
        self.tensors[self.name][rows] = 0.0
