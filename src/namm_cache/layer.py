"""`NAMMLayer`: the cache layer of one full-attention layer (storage, attention segments, eviction, compaction)."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from .attention import hand_over
from .budgets import Budget, FractionBudget, ThresholdBudget
from .config import NAMMConfig
from .masks import attention_bias, check_chunk_positions, chunk_padding, heads_hold_the_same_slots, segment_ends
from .policies import Observation, Policy
from .profiling import phase
from .selection import compaction_indices, select_tokens
from .statistics import AttentionStep, build_statistics

FeatureObserver = Callable[[int, torch.Tensor], None]

# Storage every layer keeps per slot; the policy's statistics add their own per-token tensors.
STORAGE = ("keys", "values", "positions", "token_valid")
# Free slots reserved at most when storage moves into a new room: decode steps then write in place, and each
# RESERVED_SLOTS tokens (or at each eviction round, if sooner) the kept slots are copied once into a new room.
RESERVED_SLOTS = 64


class NAMMLayer(CacheLayerMixin):
    """Cache layer of one full-attention layer that evicts tokens every `update_interval` tokens seen.

    Storage (B = batch, H = KV heads, S = slots = the most tokens any (row, head) keeps, D = head dim):
        keys, values: `(B, H, S, D)`, each (row, head) in chronological order; slots past a head's count
            are empty and masked.
        positions: `(B, H, S)` absolute position of each slot's token (index in the padded sequence).
        token_valid: `(B, H, S)` False for empty slots and for padding tokens.
        statistics: `{name: Statistic}`, one per statistic the policy needs, each with per-token tensors
            `(B, H, S, ...)` (e.g. the spectrogram's EMA, tail and pending attention).
    Per batch row: tokens of real (non-padding) input seen, next eviction point, eviction rounds.

    Invariants: `get_seq_length()` is the number of tokens seen (padding included), so positions and
    masks built by transformers stay right; an evicted token is gone from storage and never attended
    again; every per-token tensor (storage and statistics) moves with the kept indices; eviction is
    decided per batch row on that row's own real tokens, so a left-padded batch evicts what each prompt
    would alone.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(
        self,
        layer_idx: int,
        config: NAMMConfig,
        policy: Policy,
        budget: Budget | None = None,
        observer: FeatureObserver | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.policy = policy
        self.budget = budget if budget is not None else ThresholdBudget()
        self.observer = observer
        self.statistics = build_statistics(policy, config)
        self.tokens_seen = 0
        self.tokens_evicted = 0
        self.evictions = 0
        self.awaiting_observation = False
        self.observing = True
        self._room, self._room_views = None, None
        # Only one layer per cache needs to check the position ids of a forward (every layer gets the same);
        # NAMMCache clears this on all but its first NAMM layer, saving a host sync per layer and step.
        self.checks_positions = True
        # Set by NAMMCache when the policy reads the pooled key norm of every layer (namm_cache.ledger).
        self.ledger = None

    # ------------------------------------------------------------------ storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        device = key_states.device
        self.device = device
        self.keys = key_states.new_zeros(batch, heads, 0, head_dim)
        self.values = value_states.new_zeros(batch, heads, 0, value_states.shape[-1])
        self.positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=device)
        self.token_valid = torch.zeros(batch, heads, 0, dtype=torch.bool, device=device)
        self._room, self._room_views = None, None  # preallocated storage (`_reserve`)
        # Statistics are allocated when the policy first needs observations (_ensure_statistics).
        for statistic in self.statistics.values():
            statistic.clear()
        self.real_tokens_seen = [0] * batch
        self.next_eviction = [self.config.update_interval] * batch
        self.row_evictions = [0] * batch
        # Read once per sequence (a host sync on GPU): whether the policy's scores can depend on what it
        # observes. A policy changed in the middle of a sequence takes effect after reset().
        self.policy_observes = bool(self.policy.needs) and self.policy.constant_score() is None
        # Every KV head holds the same slots until a per-head eviction; tracked, not re-checked every step.
        self.heads_uniform = True
        self.is_initialized = True

    def install(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, token_valid: torch.Tensor,
                tokens_seen: int) -> None:
        """Replace this layer's contents with given slots, as if `tokens_seen` unpadded tokens had been fed and
        evicted down to them (evolution's replay fitness builds its answer caches this way).

        Args:
            keys, values: `(B, H, S, D)`; positions, token_valid: `(B, H, S)`, each (row, head) chronological.
            tokens_seen: tokens fed so far (every position is below it).
        Only for a policy that tracks no statistics (e.g. "full"): the statistics of the slots are unknown.
        """
        if self.statistics:
            raise ValueError(f"install() needs a policy without statistics; {self.policy.name!r} tracks {sorted(self.statistics)}.")
        if keys.shape[:3] != positions.shape or token_valid.shape != positions.shape or values.shape[:3] != positions.shape:
            raise ValueError(f"keys {tuple(keys.shape)}, values {tuple(values.shape)}, positions {tuple(positions.shape)} "
                             f"and token_valid {tuple(token_valid.shape)} disagree on (batch, heads, slots).")
        if positions.numel() and int(positions.max()) >= tokens_seen:
            raise ValueError(f"A position ({int(positions.max())}) is not below tokens_seen ({tokens_seen}).")
        self.lazy_initialization(keys[..., :0, :], values[..., :0, :])
        self.keys, self.values = keys.contiguous(), values.contiguous()
        self.positions, self.token_valid = positions.contiguous(), token_valid.contiguous()
        batch = keys.shape[0]
        self.tokens_seen = tokens_seen
        self.real_tokens_seen = [tokens_seen] * batch
        interval = self.config.update_interval
        self.next_eviction = [(tokens_seen // interval + 1) * interval] * batch
        self.row_evictions = [tokens_seen // interval] * batch
        self.heads_uniform = heads_hold_the_same_slots(self.positions, self.token_valid)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0] if self.is_initialized else 0

    @property
    def ema(self) -> torch.Tensor | None:
        """`(B, H, S, n_bins)` EMA of each token's attention spectrogram, or None if not tracked (yet)."""
        statistic = self.statistics.get("spectrogram")
        return statistic.tensors.get("ema") if statistic is not None else None

    def per_token_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor with one entry per slot: storage, then each statistic's (`"name.tensor"`)."""
        tensors = {name: getattr(self, name) for name in STORAGE}
        for statistic in self.statistics.values():
            tensors.update({f"{statistic.name}.{name}": tensor for name, tensor in statistic.tensors.items()})
        return tensors

    def _map_statistics(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for statistic in self.statistics.values():
            statistic.tensors = {name: function(tensor) for name, tensor in statistic.tensors.items()}

    def _map_per_token(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every per-token tensor (storage and statistics) with `function(tensor)`; reserved rooms are
        dropped (their memory freed), the next append reserves anew."""
        for name in STORAGE:
            setattr(self, name, function(getattr(self, name)))
        self._room, self._room_views = None, None
        self._map_statistics(function)
        for statistic in self.statistics.values():
            statistic.drop_rooms()

    def _ensure_statistics(self) -> None:
        """Allocate zero state for every slot for each statistic not allocated yet (tokens observed from now on)."""
        batch, heads, slots = self.token_valid.shape
        for statistic in self.statistics.values():
            if not statistic.allocated:
                statistic.allocate(batch, heads, slots, self.keys.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Evict if an eviction point was reached, then append the new chunk and return all stored K/V.

        Returns keys and values `(B, H, S + q, D)`: stored slots (some possibly empty) then the new tokens.
        """
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "NAMMCache cannot run under torch.compile: eviction changes tensor shapes at data-dependent points. "
                "Run the model uncompiled (generate() does not auto-compile this cache)."
            )
        if self.awaiting_observation:
            self.raise_missing_observation()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"Batch size changed from {self.keys.shape[0]} to {key_states.shape[0]}; a NAMMCache serves one batch of "
                "sequences. Call cache.reset() before a new batch."
            )
        self.evict_due_rows(now=self.tokens_seen - 1)
        with phase("append"):
            return self._append(key_states, value_states)

    def raise_missing_observation(self) -> None:
        """The error for a layer whose attention never reached the observation wrapper."""
        raise RuntimeError(
            f"NAMM layer {self.layer_idx} received no attention observation for its last chunk, so it cannot score "
            "tokens (it never evicts blind). The model must run its attention through the NAMM wrapper: build the "
            "cache with NAMMCache(model=model, ...) or call namm_cache.install_attention(model), and use "
            "attn_implementation 'sdpa' or 'eager'."
        )

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor):
        batch, heads, q, _ = key_states.shape
        slots = self.keys.shape[-2]
        if not self._has_room(q):
            # Room for the tokens until the next eviction round (storage the cache reaches there anyway), at most
            # RESERVED_SLOTS of them, so a short generation holds little more than it uses.
            ahead = max(point - seen for point, seen in zip(self.next_eviction, self.real_tokens_seen))
            self._reserve(slots + max(q, min(ahead, RESERVED_SLOTS)))
        room = self._room
        room["keys"][:, :, slots : slots + q].copy_(key_states)
        room["values"][:, :, slots : slots + q].copy_(value_states)
        # Positions and validity of the coming slots were written when the room was reserved.
        for name in STORAGE:
            setattr(self, name, room[name][:, :, : slots + q])
        self._room_views = tuple(getattr(self, name) for name in STORAGE)
        for statistic in self.statistics.values():
            statistic.append(q, self._room["keys"].shape[2] - slots)
        self.tokens_seen += q
        self.observing = self.policy_observes
        self.awaiting_observation = True
        hand_over(self, self.keys)
        return self.keys, self.values

    def _in_room(self) -> bool:
        """Whether the storage tensors are still the views of the reserved room that the last append made."""
        views = self._room_views
        return views is not None and all(view is getattr(self, name) for view, name in zip(views, STORAGE))

    def _has_room(self, q: int) -> bool:
        """Whether storage lives in the reserved room, with `q` more slots free in it."""
        return self._in_room() and self.keys.shape[-2] + q <= self._room["keys"].shape[2]

    def _reserve(self, capacity: int) -> None:
        """Move storage into tensors of `capacity` slots, so appends write in place (one copy per tensor)
        instead of concatenating (an allocation and a copy of all slots per tensor and step). The free slots'
        positions (the next tokens' positions, in order) and validity are written here once."""
        batch, heads, slots = self.token_valid.shape
        room = {
            "keys": self.keys.new_empty(batch, heads, capacity, self.keys.shape[-1]),
            "values": self.values.new_empty(batch, heads, capacity, self.values.shape[-1]),
            "positions": torch.empty(batch, heads, capacity, dtype=self.positions.dtype, device=self.positions.device),
            "token_valid": torch.ones(batch, heads, capacity, dtype=torch.bool, device=self.token_valid.device),
        }
        for name in STORAGE:
            room[name][:, :, :slots].copy_(getattr(self, name))
        room["positions"][:, :, slots:] = torch.arange(self.tokens_seen, self.tokens_seen + capacity - slots,
                                                       device=self.positions.device)
        self._room = room
        self._room_views = None

    def mark_padding(self, new_is_padding: torch.Tensor | None) -> None:
        """Flag the padding tokens of the chunk just appended: never attended, never kept."""
        if new_is_padding is None:
            return
        q_length = new_is_padding.shape[-1]
        self.token_valid[:, :, -q_length:] &= ~new_is_padding.unsqueeze(1)
        if self.ledger is not None:
            self.ledger.mark_padding(self.tokens_seen - q_length, new_is_padding)

    # ------------------------------------------------------------------ attention of the chunk just appended
    def run_attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        attend: Callable,
        *,
        grouped: bool,
        padding: torch.Tensor | None,
        standard_mask: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the chunk just appended over this layer's stored slots, observed and evicted on the way.

        The chunk's queries run in segments that end at the rows' eviction points; after each segment its
        probabilities are folded into the statistics, and a row that reached its point evicts before the
        next segment, exactly as it would between chunks.

        Args:
            query: `(B, query_heads, q, D)` post-RoPE queries of the chunk.
            attend: the attention function `(module, query, keys, values, mask, **kwargs) -> (output,
                probabilities)`; with `grouped` it takes a bool mask per KV head (`grouped_eager_attention`).
            padding: the model's 2D attention mask `(B, tokens seen)` or None.
            standard_mask: the mask transformers built for all layers, used as is when this layer holds
                every token and observes nothing.

        Returns:
            output `(B, q, query_heads, D)` and, when the chunk ran as one segment, `attend`'s probabilities
            (else None).
        """
        q_length = query.shape[2]
        with phase("bookkeeping"):
            new_is_padding = chunk_padding(padding, q_length, self.tokens_seen, self.keys.device)
            if self.checks_positions:
                check_chunk_positions(kwargs.get("position_ids"), new_is_padding, self.real_tokens_seen, self.tokens_seen)
            self.mark_padding(new_is_padding)
            if self.policy.pools_every_layer:
                self._refuse_left_padding(new_is_padding, q_length)
            ends = segment_ends(new_is_padding, q_length, self.real_tokens_seen, self.next_eviction, self.config.update_interval)
        if not self.observing and len(ends) == 1 and self.holds_every_token():
            # Nothing evicted, no padding, no observation needed: transformers' own mask is exactly right.
            if standard_mask is None or (isinstance(standard_mask, torch.Tensor) and standard_mask.shape[-1] == self.keys.shape[-2]):
                with phase("attention"):
                    output = attend(module, query, self.keys, self.values, standard_mask, **kwargs)
                self.observe(None, new_is_padding, q_length)
                return output
        chunk_start = self.tokens_seen - q_length
        # One query (a decode step) comes after every stored token: validity alone hides a slot.
        query_positions = None if q_length == 1 else torch.arange(chunk_start, self.tokens_seen, device=query.device)
        outputs, weights, start = [], None, 0
        for end in ends:
            with phase("mask"):
                mask = attention_bias(self.positions, self.token_valid,
                                      None if query_positions is None else query_positions[start:end],
                                      query_heads=query.shape[1], dtype=query.dtype, grouped=grouped,
                                      uniform_heads=self.heads_uniform)
            with phase("attention"):
                output, weights = attend(module, query[:, :, start:end], self.keys, self.values, mask, **kwargs)
            segment_padding = new_is_padding[:, start:end] if new_is_padding is not None else None
            with phase("observe"):
                self.observe(weights if self.observing else None, segment_padding, end - start)
            if end < q_length:
                # A row reached its eviction point inside this chunk: evict now, as it would between chunks.
                if self.policy.pools_every_layer:
                    warnings.warn(
                        "An eviction round ran inside a prefill chunk, before the later layers saw the chunk: every-layer "
                        "key norms (pooled_key_norm, linear_all_layers) then read only the earlier layers for its tokens. "
                        "Feed prompts in chunks of update_interval tokens (generate(..., prefill_chunk_size=...)) for "
                        "rounds that read every layer.", stacklevel=2)
                self.evict_due_rows(now=chunk_start + end - 1)
            outputs.append(output)
            start = end
        if len(outputs) == 1:
            return outputs[0], weights
        return torch.cat(outputs, dim=1), None

    def _refuse_left_padding(self, new_is_padding: torch.Tensor | None, q_length: int) -> None:
        """Refuse a row whose real tokens come after padding, for a policy that pools every layer's key norm.

        Such a policy reads, at a round inside a chunk, only the layers up to this one for the chunk's tokens
        (`KeyNormLedger.pooled_all_layers`). Left padding moves a row's rounds off the chunk boundaries where the
        prompt alone has them, so its evictions would differ from the prompt's alone: refused rather than silently
        different. Right padding (after every real token, as in lm-eval's log-likelihood batches) is fine."""
        before = self.tokens_seen - q_length
        padded_before = [b for b in range(self.batch_size) if self.real_tokens_seen[b] < before]
        if new_is_padding is None:
            late_real = bool(padded_before)
        else:
            real = ~new_is_padding
            late_real = any(bool(real[b].any()) for b in padded_before)
            if not late_real and q_length > 1:  # one query (a decode step) cannot hold padding before a real token:
                # no tensor reduction, and no host sync on an accelerator, on every layer of every step
                after_padding = real & new_is_padding.to(torch.int8).cummax(dim=-1).values.bool()
                late_real = bool(after_padding.any())
        if late_real:
            reader = "A linear_all_layers scorer" if self.policy.name == "namm" else f"The {self.policy.name} policy"
            raise ValueError(
                f"{reader} reads every layer's key norms, so where a round falls between or inside prefill chunks "
                "changes what it reads. A left-padded batch moves its rows' rounds inside chunks, and they would evict "
                "differently from the same prompts alone. Run these prompts one at a time (batch size 1) or right-pad "
                "them, and call cache.reset() before using this cache again."
            )

    # ------------------------------------------------------------------ observation -> statistics
    def observe(self, weights: torch.Tensor | None, new_is_padding: torch.Tensor | None, q_length: int) -> None:
        """Fold these queries' attention probabilities into every statistic the policy needs.

        Args:
            weights: `(B, query_heads, q, S)` or, grouped by KV head, `(B, H, G, q, S)`: post-softmax
                attention of `q` consecutive queries over the stored slots, or None when the policy does not
                need observations (only counts advance).
            new_is_padding: `(B, q)` bool (None: no padding); padding queries are not part of any statistic.
        """
        if new_is_padding is None:
            real_queries = None
            real_counts = [q_length] * self.batch_size
        else:
            real_queries = ~new_is_padding
            real_counts = real_queries.sum(-1).tolist()
        if weights is not None and self.statistics:
            self._ensure_statistics()
            batch, heads, slots = self.token_valid.shape
            q = weights.shape[-2]
            groups = weights.numel() // (batch * heads * q * slots)
            probabilities = weights.detach().to(torch.float32)
            probabilities = probabilities.view(batch, heads, groups, q, slots).mean(2) if groups > 1 else probabilities
            step = AttentionStep(probabilities, real_queries, self.real_tokens_seen, self.next_eviction)
            for statistic in self.statistics.values():
                statistic.fold(step)
        for b, count in enumerate(real_counts):
            self.real_tokens_seen[b] += count
        self.awaiting_observation = False

    # ------------------------------------------------------------------ eviction
    def evict_due_rows(self, now: int) -> None:
        """Score and evict in every batch row that has reached its next eviction point.

        `now` is the position of the newest token processed; tokens at later positions (the rest of the
        current chunk, when a row's point falls inside it) are neither scored nor evicted.
        """
        due = [b for b in range(self.batch_size) if self.real_tokens_seen[b] >= self.next_eviction[b]]
        if not due:
            return
        self._evict(due, now)
        for b in due:
            while self.next_eviction[b] <= self.real_tokens_seen[b]:
                self.next_eviction[b] += self.config.update_interval

    def observation(self, rows: list[int], now: int) -> Observation:
        """What the policy sees of batch `rows` at position `now` (one observation row per (row, KV head)).

        Tokens at positions after `now` (the rest of a chunk, mid-chunk) are not valid for scoring.
        """
        heads, slots = self.token_valid.shape[1:]
        index = torch.tensor(rows, device=self.keys.device)
        positions = self.positions[index].reshape(-1, slots)
        valid = self.token_valid[index].reshape(-1, slots) & (positions <= now)
        budgets = [self.budget.tokens_for(self.real_tokens_seen[b]) for b in rows]
        budget = None if budgets[0] is None else torch.tensor(budgets, device=positions.device).repeat_interleave(heads)
        pooled = None
        if self.ledger is not None and self.policy.reads_pooled_key_norm:
            if self.policy.pools_every_layer:
                per_row = self.ledger.pooled_all_layers(index, now)
            else:
                per_row = self.ledger.pooled(index, now, self.layer_idx)
            per_row = per_row.to(positions.device).repeat_interleave(heads, dim=0)
            pooled = per_row.gather(1, positions.clamp(0, now)) * valid
        return Observation(
            layer_idx=self.layer_idx,
            keys=self.keys[index].reshape(-1, slots, self.keys.shape[-1]),
            values=self.values[index].reshape(-1, slots, self.values.shape[-1]),
            positions=positions,
            valid=valid,
            age=(now - positions).clamp_min(0),
            config=self.config,
            budget=budget,
            statistics={name: statistic.value(index, heads, slots) for name, statistic in self.statistics.items()},
            eviction_round=torch.tensor([self.row_evictions[b] for b in rows], device=positions.device).repeat_interleave(heads),
            batch_rows=index.repeat_interleave(heads),
            head_index=torch.arange(heads, device=positions.device).repeat(len(rows)),
            pooled_key_norm=pooled,
        )

    def _evict(self, due_rows: list[int], now: int) -> None:
        batch, heads, slots = self.token_valid.shape
        keep = self.token_valid.clone()
        index = torch.tensor(due_rows, device=self.keys.device)
        with phase("score"):
            observation = self.observation(due_rows, now)
        positions, valid, budget = observation.positions, observation.valid, observation.budget
        present = self.token_valid[index].reshape(-1, slots)
        arrived = positions <= now
        spectrogram = observation.statistics.get("spectrogram")
        if self.observer is not None and spectrogram is not None:
            self.observer(self.layer_idx, spectrogram[valid])
        with phase("score"):
            scores = self.policy.score(observation)
        if scores.shape != valid.shape:
            raise ValueError(f"Policy {type(self.policy).__name__} returned scores of shape {tuple(scores.shape)}, expected {tuple(valid.shape)}.")
        with phase("select"):
            if budget is None:
                floor = None
                if self.config.min_fraction is not None:
                    fraction = FractionBudget(self.config.min_fraction)
                    floor = torch.tensor([fraction.tokens_for(self.real_tokens_seen[b]) for b in due_rows],
                                         device=positions.device).repeat_interleave(heads)
                kept = select_tokens(scores, valid, positions, threshold=self.config.threshold, max_tokens=self.config.max_tokens,
                                     min_tokens=floor, **self.config.selection_rules())
            else:
                if self.config.max_tokens is not None:
                    budget = budget.clamp_max(self.config.max_tokens)
                kept = select_tokens(scores, valid, positions, threshold=None, max_tokens=budget,
                                     **self.config.selection_rules())
        kept |= present & ~arrived
        keep[index] = kept.view(len(due_rows), heads, slots)
        for statistic in self.statistics.values():
            if statistic.allocated:
                statistic.evicted(index)
        removed = int(self.token_valid.sum() - keep.sum())
        self.tokens_evicted += removed
        self.evictions += 1
        for b in due_rows:
            self.row_evictions[b] += 1
        if removed or not bool(keep.all()):
            with phase("compact"):
                self._compact(keep)

    def keep_slots(self, keep: torch.Tensor) -> None:
        """Keep only the slots where `keep` `(B, H, S)` is True, as an eviction round would (no policy is asked).
        Evolution's replay fitness applies a member's replayed rounds to its answer cache this way."""
        if keep.shape != self.token_valid.shape or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor of shape {tuple(self.token_valid.shape)}, got {keep.dtype} {tuple(keep.shape)}.")
        if self.statistics:
            raise ValueError(f"keep_slots() needs a policy without statistics; {self.policy.name!r} tracks {sorted(self.statistics)}.")
        keep = keep & self.token_valid
        self.tokens_evicted += int(self.token_valid.sum() - keep.sum())
        self._compact(keep)

    def holds_every_token(self) -> bool:
        """True while nothing was evicted or masked: slots are exactly the tokens seen, all real."""
        return self.keys.shape[-2] == self.tokens_seen and bool(self.token_valid.all())

    def _compact(self, keep: torch.Tensor) -> None:
        """Shrink storage to the kept slots of every (row, head); kept tokens stay in chronological order."""
        batch, heads, slots = keep.shape
        order, slot_valid = compaction_indices(keep.reshape(batch * heads, slots))
        new_slots = order.shape[-1]
        order = order.view(batch, heads, new_slots)

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            index = order[(..., *([None] * (tensor.dim() - 3)))].expand(batch, heads, new_slots, *tensor.shape[3:])
            return tensor.gather(2, index).contiguous()

        self._map_per_token(gather)
        self.token_valid &= slot_valid.view(batch, heads, new_slots)
        self.heads_uniform = heads_hold_the_same_slots(self.positions, self.token_valid)

    # ------------------------------------------------------------------ transformers API
    def get_seq_length(self) -> int:
        return self.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.keys.shape[-2] if self.is_initialized else 0
        return stored + query_length, self.tokens_seen - stored

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self._room, self._room_views = None, None
        self.is_initialized = False
        self.tokens_seen = 0
        self.tokens_evicted = 0
        self.evictions = 0
        self.awaiting_observation = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "NAMMCache cannot be cropped: evicted tokens cannot be restored, so assisted / speculative decoding (which "
            "rolls the cache back) is not supported. Use generate() without an assistant model."
        )

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.keys.device)
        self._map_per_token(lambda tensor: tensor.index_select(0, index))
        rows = index.tolist()
        for statistic in self.statistics.values():
            if statistic.allocated:
                statistic.select_rows(rows)
        self.real_tokens_seen = [self.real_tokens_seen[i] for i in rows]
        self.next_eviction = [self.next_eviction[i] for i in rows]
        self.row_evictions = [self.row_evictions[i] for i in rows]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.batch_size, device=self.keys.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self._select_batch(indices)

    # ------------------------------------------------------------------ accounting
    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values: the slots in use plus the free slots reserved for the tokens
        until the next eviction round (`reserved_kv_bytes`)."""
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes + self.reserved_kv_bytes()

    def reserved_kv_bytes(self) -> int:
        """Bytes of the free key and value slots reserved for the coming tokens (0 outside a reserved room)."""
        if not self.is_initialized or not self._in_room():
            return 0
        return self._room["keys"].nbytes + self._room["values"].nbytes - self.keys.nbytes - self.values.nbytes

    def state_bytes(self) -> int:
        """Bytes of everything kept per token besides keys and values (positions, flags, statistics), reserved
        free slots included."""
        if not self.is_initialized:
            return 0
        in_room = self._in_room()
        storage = sum((self._room[name] if in_room else getattr(self, name)).nbytes for name in ("positions", "token_valid"))
        return storage + sum(statistic.allocated_bytes() for statistic in self.statistics.values())

    def kept_per_head(self) -> torch.Tensor:
        """`(B, H)` number of real tokens each (row, KV head) holds."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.long)
        return self.token_valid.sum(-1)
