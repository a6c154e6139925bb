"""`NAMMCache`: a transformers `Cache` whose full-attention layers score tokens and evict them in `update`."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from .attention import hand_over, install_attention
from .budgets import Budget, ThresholdBudget, parse_budget
from .config import NAMMConfig
from .features import SpectrogramState, fold_attention
from .profiling import phase
from .policies import FullCachePolicy, NAMMPolicy, Observation, Policy, build_policy
from .policies.base import ATTENTION_SUM, LAST_ATTENTION, SPECTROGRAM, TRACKERS, WINDOW_ATTENTION
from .scorers import BAMScorer, Scorer
from .selection import compaction_indices, select_tokens

FeatureObserver = Callable[[int, torch.Tensor], None]


class NAMMLayer(CacheLayerMixin):
    """Cache layer of one full-attention layer that evicts tokens every `update_interval` tokens seen.

    Storage (B = batch, H = KV heads, S = slots = the most tokens any (row, head) keeps, D = head dim):
        keys, values: `(B, H, S, D)`, each (row, head) in chronological order; slots past a head's count
            are empty and masked.
        positions: `(B, H, S)` absolute position of each slot's token (index in the padded sequence).
        token_valid: `(B, H, S)` False for empty slots and for padding tokens.
        spectrogram state: EMA `(B, H, S, n_bins)`, tail and pending attention `(B, H, S, hop)`.
    Per batch row: tokens of real (non-padding) input seen, pending attention count, next eviction point.

    Invariants: `get_seq_length()` is the number of tokens seen (padding included), so positions and
    masks built by transformers stay right; an evicted token is gone from storage and never attended
    again; whatever the layer keeps per token moves with the kept indices; eviction is decided per batch
    row on that row's own real tokens, so a left-padded batch evicts what each prompt would alone.
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
        self.tokens_seen = 0
        self.tokens_evicted = 0
        self.evictions = 0
        self.awaiting_observation = False
        self.observing = True

    # ------------------------------------------------------------------ storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        device, config = key_states.device, self.config
        self.device = device
        self.keys = key_states.new_zeros(batch, heads, 0, head_dim)
        self.values = value_states.new_zeros(batch, heads, 0, value_states.shape[-1])
        self.positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=device)
        self.token_valid = torch.zeros(batch, heads, 0, dtype=torch.bool, device=device)
        # Per-token statistics are allocated when the policy first needs observations (_ensure_feature_state).
        self.ema = self.tail = self.pending = None
        self.attention_sum = self.last_attention = self.window_attention = None
        self.pending_count = [0] * batch
        self.real_tokens_seen = [0] * batch
        self.next_eviction = [config.update_interval] * batch
        self.row_evictions = [0] * batch
        self.is_initialized = True

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0] if self.is_initialized else 0

    def _per_token_tensors(self) -> list[str]:
        names = ["keys", "values", "positions", "token_valid", "ema", "tail", "pending", *TRACKERS]
        return [name for name in names if getattr(self, name) is not None]

    def _ensure_feature_state(self) -> None:
        """Allocate zero statistics for every slot for what the policy needs (tokens observed from now on)."""
        batch, heads, slots = self.token_valid.shape
        device = self.keys.device
        needs = self.policy.needs
        if SPECTROGRAM in needs and self.ema is None:
            self.ema = torch.zeros(batch, heads, slots, self.config.n_bins, device=device)
            self.tail = torch.zeros(batch, heads, slots, self.config.hop_length, device=device)
            self.pending = torch.zeros(batch, heads, slots, self.config.hop_length, device=device)
            self.pending_count = [0] * batch
        for name in TRACKERS:
            if name in needs and getattr(self, name) is None:
                setattr(self, name, torch.zeros(batch, heads, slots, device=device))

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
        device = self.keys.device
        new_positions = torch.arange(self.tokens_seen, self.tokens_seen + q, device=device).expand(batch, heads, q)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_positions], dim=-1)
        self.token_valid = torch.cat([self.token_valid, torch.ones(batch, heads, q, dtype=torch.bool, device=device)], dim=-1)
        for name in self._per_token_tensors()[4:]:
            state = getattr(self, name)
            setattr(self, name, torch.cat([state, state.new_zeros(batch, heads, q, *state.shape[3:])], dim=2))
        self.tokens_seen += q
        self.observing = bool(self.policy.needs) and self.policy.constant_score() is None
        self.awaiting_observation = True
        hand_over(self, self.keys)
        return self.keys, self.values

    # ------------------------------------------------------------------ masks
    def new_token_padding(self, padding_mask: torch.Tensor | None, q_length: int) -> torch.Tensor | None:
        """`(B, q)` bool, True where a token of the current chunk is padding, from the model's 2D mask
        (None when the model got no mask: no padding anywhere)."""
        if padding_mask is None:
            return None
        if padding_mask.dim() != 2:
            raise ValueError("NAMMCache needs a 2D attention mask (batch, sequence); got a prepared 4D mask.")
        if padding_mask.shape[-1] != self.tokens_seen:
            raise RuntimeError(
                f"This NAMMCache has seen {self.tokens_seen} tokens but the attention mask covers {padding_mask.shape[-1]}. "
                "A NAMMCache serves one sequence (per batch row) from its start: call cache.reset() before a new prompt, "
                "and do not pass a cache used for another prompt."
            )
        return ~padding_mask[:, -q_length:].to(device=self.keys.device, dtype=torch.bool)

    def check_positions(self, position_ids: torch.Tensor | None, new_is_padding: torch.Tensor | None) -> None:
        """Refuse a chunk whose position ids do not continue this cache's sequence (a reused cache).

        The last real token of each row must sit at that row's real-token count (generate's padding-aware
        positions) or at the absolute index (positions counted over padding, as a bare forward does).
        """
        if position_ids is None or position_ids.dim() != 2:
            return
        q_length = position_ids.shape[-1]
        last = position_ids[:, -1].tolist()
        if new_is_padding is None:
            real_in_chunk, last_is_padding = [q_length] * self.batch_size, [False] * self.batch_size
        else:
            real_in_chunk = (~new_is_padding).sum(-1).tolist()
            last_is_padding = new_is_padding[:, -1].tolist()
        for b in range(self.batch_size):
            row_last = last[b if len(last) > 1 else 0]
            if last_is_padding[b]:
                continue
            expected = {self.real_tokens_seen[b] + real_in_chunk[b] - 1, self.tokens_seen - 1}
            if row_last not in expected:
                raise RuntimeError(
                    f"This NAMMCache has seen {self.tokens_seen} tokens, but the chunk's last position id is {row_last} "
                    f"(expected {max(expected)}). A NAMMCache serves one sequence (per batch row) from its start: call "
                    "cache.reset() before a new prompt, and do not pass a cache used for another prompt."
                )

    def mark_padding(self, new_is_padding: torch.Tensor | None) -> None:
        """Flag the padding tokens of the chunk just appended: never attended, never kept."""
        if new_is_padding is None:
            return
        q_length = new_is_padding.shape[-1]
        self.token_valid[:, :, -q_length:] &= ~new_is_padding.unsqueeze(1)

    def attention_bias(self, query_positions: torch.Tensor, query_heads: int, dtype: torch.dtype,
                       grouped: bool = False) -> torch.Tensor:
        """Additive mask for queries at `query_positions` over the stored slots.

        A slot is visible to a query iff it holds a real token of that (row, head) at a position <= the
        query's: stored tokens, padding, per-head eviction and causality inside the chunk in one rule,
        whatever the slot layout. Masked entries get the dtype's minimum, like transformers' eager masks.

        Returns:
            `(B, 1 or query_heads, q, S)` additive mask in `dtype`; with `grouped`, a bool mask
            `(B, 1 or H, 1, q, S)`, True = hidden (one mask per KV head, broadcast over its query heads,
            applied with `masked_fill_`; see `grouped_eager_attention`).
        """
        batch, heads, slots = self.token_valid.shape
        valid, positions = self.token_valid, self.positions
        uniform_heads = heads == 1 or (bool((positions == positions[:, :1]).all()) and bool((valid == valid[:, :1]).all()))
        if uniform_heads:
            valid, positions = valid[:, :1], positions[:, :1]
        if grouped:
            hidden = (positions.unsqueeze(2) > query_positions.view(1, 1, -1, 1)).logical_or_(~valid.unsqueeze(2))
            return hidden.unsqueeze(2)
        allowed = valid.unsqueeze(2) & (positions.unsqueeze(2) <= query_positions.view(1, 1, -1, 1))
        if not uniform_heads and query_heads != heads:
            groups = query_heads // heads
            q_length = query_positions.shape[0]
            allowed = allowed.unsqueeze(2).expand(batch, heads, groups, q_length, slots).reshape(batch, query_heads, q_length, slots)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return bias.masked_fill_(~allowed, torch.finfo(dtype).min)

    def segment_ends(self, new_is_padding: torch.Tensor | None, q_length: int) -> list[int]:
        """Where to split this chunk's queries so that each row evicts exactly at its eviction points.

        A row reaches an eviction point after a given number of its own real tokens; with left padding (or
        chunks longer than `update_interval`) that can fall inside a chunk. Returns sorted exclusive ends;
        the last is always the chunk length (an eviction point there is handled by the next `update`).
        """
        ends = {q_length}
        interval = self.config.update_interval
        if new_is_padding is None:  # every query is real: eviction points in plain arithmetic
            for b in range(self.batch_size):
                end = self.next_eviction[b] - self.real_tokens_seen[b]
                while end < q_length:
                    ends.add(end)
                    end += interval
            return sorted(ends)
        real_counts = (~new_is_padding).cumsum(-1)
        for b in range(new_is_padding.shape[0]):
            target = self.next_eviction[b]
            reached = self.real_tokens_seen[b] + real_counts[b]
            while True:
                hits = (reached == target) & ~new_is_padding[b]
                if not bool(hits.any()):
                    break
                ends.add(int(hits.nonzero()[0]) + 1)
                target += interval
        return sorted(ends)

    # ------------------------------------------------------------------ observation -> features
    def observe(self, weights: torch.Tensor | None, new_is_padding: torch.Tensor | None, q_length: int) -> None:
        """Fold these queries' attention probabilities into each token's spectrogram state.

        Args:
            weights: `(B, query_heads, q, S)` or, grouped by KV head, `(B, H, G, q, S)`: post-softmax
                attention of `q` consecutive queries over the stored slots, or None when the policy does not
                need observations (only counts advance).
            new_is_padding: `(B, q)` bool (None: no padding); padding queries are not part of any time series.
        """
        if new_is_padding is None:
            real_queries = None
            real_counts = [q_length] * self.batch_size
        else:
            real_queries = ~new_is_padding
            real_counts = real_queries.sum(-1).tolist()
        if weights is not None:
            self._ensure_feature_state()
            batch, heads, slots = self.token_valid.shape
            q = weights.shape[-2]
            groups = weights.numel() // (batch * heads * q * slots)
            probs = weights.detach().to(torch.float32)
            probs = probs.view(batch, heads, groups, q, slots).mean(2) if groups > 1 else probs
            if self.ema is not None:
                self._fold_spectrogram(probs, real_queries)
            if any(getattr(self, name) is not None for name in TRACKERS):
                self._update_trackers(probs, real_queries)
        for b, count in enumerate(real_counts):
            self.real_tokens_seen[b] += count
        self.awaiting_observation = False

    def _fold_spectrogram(self, probs: torch.Tensor, real_queries: torch.Tensor | None) -> None:
        batch, _, q, _ = probs.shape
        if (real_queries is None or bool(real_queries.all())) and len(set(self.pending_count)) == 1:
            self._fold_rows(None, probs.transpose(-1, -2))
            return
        for b in range(batch):
            rows = real_queries[b] if real_queries is not None else torch.ones(q, dtype=torch.bool, device=probs.device)
            if bool(rows.any()):
                self._fold_rows([b], probs[b : b + 1][:, :, rows].transpose(-1, -2))

    def _update_trackers(self, probs: torch.Tensor, real_queries: torch.Tensor | None) -> None:
        """Accumulate the attention statistics baseline policies read (H2O, TOVA, SnapKV)."""
        batch, _, q, _ = probs.shape
        real = real_queries if real_queries is not None else torch.ones(batch, q, dtype=torch.bool, device=probs.device)
        weight = real.to(probs.dtype)[:, None, :, None]
        if self.attention_sum is not None:
            self.attention_sum += (probs * weight).sum(2)
        if self.last_attention is not None:
            for b in range(batch):
                indices = real[b].nonzero()
                if len(indices):
                    self.last_attention[b] = probs[b, :, int(indices[-1])]
        if self.window_attention is not None:
            # Query number r (1-based, real queries of the row) is in the observation window of the row's next
            # eviction point E iff E - window < r <= E.
            start = torch.tensor(self.real_tokens_seen, device=probs.device).unsqueeze(-1)
            number = start + real.cumsum(-1)
            point = torch.tensor(self.next_eviction, device=probs.device).unsqueeze(-1)
            in_window = real & (number > point - self.policy.window) & (number <= point)
            self.window_attention += (probs * in_window.to(probs.dtype)[:, None, :, None]).sum(2)

    def _fold_rows(self, rows: list[int] | None, values: torch.Tensor) -> None:
        """Fold `values` `(len(rows), H, S, q)` (any strides) into the state of batch `rows` (all rows if None)."""
        index = slice(None) if rows is None else torch.tensor(rows, device=self.ema.device)
        state = SpectrogramState(
            ema=self.ema[index],
            tail=self.tail[index],
            pending=self.pending[index],
            pending_count=self.pending_count[0 if rows is None else rows[0]],
        )
        state = fold_attention(state, values, self.config)
        if rows is None:
            self.ema, self.tail, self.pending = state.ema, state.tail, state.pending
        else:
            self.ema[index] = state.ema
            self.tail[index] = state.tail
            self.pending[index] = state.pending
        for b in range(self.batch_size) if rows is None else rows:
            self.pending_count[b] = state.pending_count

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

        def rows_of(name: str) -> torch.Tensor | None:
            tensor = getattr(self, name)
            return None if tensor is None else tensor[index].reshape(-1, slots, *tensor.shape[3:])

        spectrogram = rows_of("ema")
        return Observation(
            layer_idx=self.layer_idx,
            keys=self.keys[index].reshape(-1, slots, self.keys.shape[-1]),
            positions=positions,
            valid=valid,
            age=(now - positions).clamp_min(0),
            spectrogram=spectrogram if spectrogram is not None else torch.zeros(*positions.shape, self.config.n_bins, device=positions.device),
            config=self.config,
            budget=budget,
            attention_sum=rows_of(ATTENTION_SUM),
            last_attention=rows_of(LAST_ATTENTION),
            window_attention=rows_of(WINDOW_ATTENTION),
            eviction_round=torch.tensor([self.row_evictions[b] for b in rows], device=positions.device).repeat_interleave(heads),
            batch_rows=index.repeat_interleave(heads),
            head_index=torch.arange(heads, device=positions.device).repeat(len(rows)),
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
        if self.observer is not None:
            self.observer(self.layer_idx, observation.spectrogram[valid])
        with phase("score"):
            scores = self.policy.score(observation)
        if scores.shape != valid.shape:
            raise ValueError(f"Policy {type(self.policy).__name__} returned scores of shape {tuple(scores.shape)}, expected {tuple(valid.shape)}.")
        with phase("select"):
            if budget is None:
                kept = select_tokens(scores, valid, positions, threshold=self.config.threshold, max_tokens=self.config.max_tokens)
            else:
                if self.config.max_tokens is not None:
                    budget = budget.clamp_max(self.config.max_tokens)
                kept = select_tokens(scores, valid, positions, threshold=None, max_tokens=budget)
        kept |= present & ~arrived
        keep[index] = kept.view(len(due_rows), heads, slots)
        if self.window_attention is not None:
            self.window_attention[index] = 0.0  # a new observation window starts
        removed = int(self.token_valid.sum() - keep.sum())
        self.tokens_evicted += removed
        self.evictions += 1
        for b in due_rows:
            self.row_evictions[b] += 1
        if removed or not bool(keep.all()):
            with phase("compact"):
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
        for name in self._per_token_tensors():
            tensor = getattr(self, name)
            if tensor.dim() == 4:
                gathered = tensor.gather(2, order.unsqueeze(-1).expand(batch, heads, new_slots, tensor.shape[-1]))
            else:
                gathered = tensor.gather(2, order)
            setattr(self, name, gathered.contiguous())
        self.token_valid &= slot_valid.view(batch, heads, new_slots)

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
        for name in self._per_token_tensors():
            setattr(self, name, getattr(self, name).index_select(0, index))
        rows = index.tolist()
        self.pending_count = [self.pending_count[i] for i in rows]
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
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def state_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(getattr(self, name).nbytes for name in self._per_token_tensors()[2:])

    def kept_per_head(self) -> torch.Tensor:
        """`(B, H)` number of real tokens each (row, KV head) holds."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.long)
        return self.token_valid.sum(-1)


def _layer_bytes(layer: Any) -> int:
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    return sum(t.nbytes for t in (keys, values) if isinstance(t, torch.Tensor))


class NAMMCache(Cache):
    """A drop-in transformers cache that keeps only the tokens a NAMM scorer (or another policy) keeps.

    Full-attention layers get a `NAMMLayer`; sliding-window, linear-attention and shared-KV layers get
    transformers' own layer classes, so hybrid models (Gemma3) work. Every `update_interval` tokens seen,
    in prefill chunks and decoding alike, each NAMM layer scores its tokens per (batch row, KV head) from
    the attention they received and frees the ones it evicts.

    Args:
        model: the model this cache serves. Its attention is routed through the NAMM observation wrapper
            (eager or sdpa); its config gives the layer layout.
        scorer: the shared scorer (default: a zero-initialised `BAMScorer`, which keeps every token).
        config: a `NAMMConfig` (default: the paper's constants).
        model_config: the model config, when no `model` is given (then call `install_attention(model)`).
        policy: an explicit `Policy`; by default `NAMMPolicy(scorer)`.
        **overrides: `NAMMConfig` fields to change, e.g. `update_interval=128, max_tokens=1024`.

    Example:
        >>> cache = NAMMCache(model=model, scorer=BAMScorer(), update_interval=512)
        >>> out = model.generate(**inputs, past_key_values=cache, prefill_chunk_size=512, max_new_tokens=64)
        >>> cache.stats()["kv_bytes"]
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        scorer: Scorer | None = None,
        config: NAMMConfig | None = None,
        model_config: Any = None,
        policy: Policy | str | None = None,
        budget: Any = None,
        policy_kwargs: dict[str, Any] | None = None,
        **overrides: Any,
    ):
        if config is not None and not isinstance(config, NAMMConfig):
            raise ValueError(f"config must be a NAMMConfig (NAMMConfig.from_dict(fields) reads a dict), got {type(config).__name__}.")
        namm_config = (config or NAMMConfig()).replace(**overrides) if overrides else (config or NAMMConfig())
        if model is None and model_config is None:
            raise ValueError("NAMMCache needs the model it serves: NAMMCache(model=model, ...).")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be the transformers model this cache serves, got {type(model).__name__}: {model!r:.60}.")
        if scorer is not None and not isinstance(scorer, Scorer):
            raise ValueError(
                f"scorer must be a Scorer (BAMScorer(), MLPScorer()), got {type(scorer).__name__}: {scorer!r:.60}; "
                "to load a saved scorer by name or path use NAMMCache.from_pretrained(name, model=model)."
            )
        if policy is not None and not isinstance(policy, (str, Policy)):
            raise ValueError(f"policy must be a policy name (e.g. 'h2o') or a Policy, got {type(policy).__name__}: {policy!r:.60}.")
        if policy_kwargs is not None and not isinstance(policy_kwargs, dict):
            raise ValueError(f"policy_kwargs must be a dict of the policy's constructor arguments, got {type(policy_kwargs).__name__}.")
        model_config = model_config if model_config is not None else model.config
        text_config = model_config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        if "full_attention" not in layer_types:
            raise ValueError(
                f"This model has no full-attention layer (layer types: {sorted(set(layer_types))}); NAMM evicts from "
                "full-attention layers only, so there is nothing to manage. Use transformers' DynamicCache."
            )
        if isinstance(policy, str):
            if policy.lower() == "namm":
                policy = None
            else:
                if scorer is not None:
                    raise ValueError(f"A scorer only applies to the 'namm' policy, not {policy!r}; drop scorer=.")
                policy = build_policy(policy, **(policy_kwargs or {}))
        elif policy_kwargs:
            raise ValueError("policy_kwargs applies only when the policy is given by name.")
        if scorer is None and policy is None:
            scorer = BAMScorer(input_dim=namm_config.feature_dim, n_bins=namm_config.n_bins)
        if scorer is not None:
            if scorer.input_dim != namm_config.feature_dim or scorer.n_bins != namm_config.n_bins:
                raise ValueError(
                    f"The scorer reads {scorer.input_dim} features with {scorer.n_bins} spectrogram bins, but this NAMMConfig "
                    f"produces {namm_config.feature_dim} features ({namm_config.recency_dim} recency + {namm_config.n_bins} bins). "
                    f"Build the scorer with input_dim={namm_config.feature_dim}, n_bins={namm_config.n_bins}, or change "
                    "n_fft / recency_dim to match the scorer."
                )
        if scorer is not None and model is not None:
            # Score where the cache lives: a scorer left on the CPU would pull every layer's features off the GPU.
            device = next((p.device for p in model.parameters()), None)
            if device is not None:
                scorer.to(device)
        self.policy = policy if policy is not None else NAMMPolicy(scorer)
        if isinstance(self.policy, FullCachePolicy):
            namm_config = namm_config.replace(max_tokens=None)  # a full cache is never capped
        self.namm_config = namm_config
        self.scorer = scorer
        self.budget = self.policy.check_budget(parse_budget(budget))
        self.feature_observer: FeatureObserver | None = None
        layers = []
        for idx, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
            if layer_type == "full_attention":
                layers.append(NAMMLayer(idx, self.namm_config, self.policy, self.budget, observer=self._observe_features))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        super().__init__(layers=layers)
        self.peak_kv_bytes = 0
        self._held_bytes = 0
        self._layer_held = [0] * len(self.layers)
        self._last_namm_layer: NAMMLayer | None = None
        if model is not None:
            install_attention(model)

    # ------------------------------------------------------------------ Hub
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Any = None,
        *,
        model: nn.Module,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Any = None,
        budget: Any = None,
        **overrides: Any,
    ) -> "NAMMCache":
        """Build a cache around a saved scorer: a local folder, a Hub repo id (the local HF cache when
        `HF_HUB_OFFLINE=1`), or a scorer bundled with the package (default: `namm-cache/smollm2-135m-bam`, the evolved scorer).

        `overrides` change runtime settings of the stored `NAMMConfig` (e.g. `update_interval=256`,
        `max_tokens=1024`) without touching the weights.
        """
        from .hub import DEFAULT_SCORER, load_scorer

        loaded = load_scorer(name_or_path or DEFAULT_SCORER, revision=revision, token=token, cache_dir=cache_dir)
        config = loaded.config.replace(**overrides) if overrides else loaded.config
        cache = cls(model=model, scorer=loaded.scorer, config=config, budget=budget)
        cache.scorer_metadata = loaded.metadata
        cache.scorer_source = loaded.source
        return cache

    def _require_scorer(self) -> Scorer:
        if self.scorer is None or not isinstance(self.policy, NAMMPolicy):
            raise ValueError(f"Only NAMM caches have a scorer to save; this cache runs policy {self.policy.name!r}.")
        return self.scorer

    def save_pretrained(self, path: str | Any, metadata: Any = None, repo_id: str | None = None) -> Any:
        """Save the scorer, its normalisation statistics and this cache's `NAMMConfig` (+ a model card)."""
        from .hub import save_scorer

        return save_scorer(path, self._require_scorer(), self.namm_config, metadata or getattr(self, "scorer_metadata", None), repo_id=repo_id)

    def push_to_hub(self, repo_id: str, *, metadata: Any = None, token: str | None = None, private: bool | None = None,
                    create_pr: bool = False, commit_message: str = "Upload NAMM scorer", api: Any = None) -> Any:
        """Save to a temporary folder and upload it as one commit with `huggingface_hub`."""
        import tempfile

        from .hub import push_scorer

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, metadata=metadata, repo_id=repo_id)
            return push_scorer(folder, repo_id, token=token, private=private, create_pr=create_pr,
                               commit_message=commit_message, api=api)

    def _observe_features(self, layer_idx: int, spectrogram: torch.Tensor) -> None:
        if self.feature_observer is not None:
            self.feature_observer(layer_idx, spectrogram)

    @property
    def namm_layers(self) -> list[NAMMLayer]:
        return [layer for layer in self.layers if isinstance(layer, NAMMLayer)]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"This NAMMCache was built for a model with {len(self.layers)} layers but was asked to update layer "
                f"{layer_idx}: it serves another model. Build one cache per model: NAMMCache(model=model, ...)."
            )
        previous = self._last_namm_layer
        if previous is not None and previous.awaiting_observation and previous is not self.layers[layer_idx]:
            previous.raise_missing_observation()
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if isinstance(layer, NAMMLayer):
            self._last_namm_layer = layer
        # Running total of bytes held: each layer's contribution is refreshed when it is updated.
        held = _layer_bytes(layer)
        self._held_bytes += held - self._layer_held[layer_idx]
        self._layer_held[layer_idx] = held
        self.peak_kv_bytes = max(self.peak_kv_bytes, self._held_bytes)
        return keys, values

    def kv_bytes(self) -> int:
        """Bytes of keys and values held now, all layers."""
        return sum(_layer_bytes(layer) for layer in self.layers)

    def reset(self) -> None:
        """Forget everything: the cache can then serve a new prompt."""
        for layer in self.layers:
            layer.reset()
        self.peak_kv_bytes = 0
        self._held_bytes = 0
        self._layer_held = [0] * len(self.layers)
        self._last_namm_layer = None

    def crop(self, tokens_to_remove: int) -> None:
        self.namm_layers[0].crop(tokens_to_remove)

    def stats(self) -> dict[str, Any]:
        """Tokens seen and kept, per layer and head, and the memory held versus a full cache.

        Returns a dict with `tokens_seen`, `kept_per_layer` (`{layer: (B, H) list}`, NAMM layers),
        `mean_kept_fraction` (kept real tokens / real tokens seen, NAMM layers), `kv_bytes` (held now, all
        layers), `full_cache_kv_bytes` (a DynamicCache at the same point), `peak_kv_bytes`,
        `state_bytes` (NAMM per-token feature state), `evicted_tokens` and `evictions`.
        """
        namm = [layer for layer in self.namm_layers if layer.is_initialized]
        full_bytes = 0
        for layer in self.layers:
            if isinstance(layer, NAMMLayer):
                if layer.is_initialized:
                    b, h, _, d = layer.keys.shape
                    full_bytes += 2 * b * h * layer.tokens_seen * d * layer.keys.element_size()
            else:
                full_bytes += _layer_bytes(layer)
        kept_fraction = None
        if namm:
            real_seen = sum(sum(layer.real_tokens_seen) * layer.keys.shape[1] for layer in namm)
            kept = sum(int(layer.token_valid.sum()) for layer in namm)
            kept_fraction = kept / real_seen if real_seen else 1.0
        return {
            "policy": self.policy.name,
            "budget": self.budget.describe(),
            "tokens_seen": self.get_seq_length(),
            "kept_per_layer": {layer.layer_idx: layer.kept_per_head().tolist() for layer in namm},
            "mean_kept_fraction": kept_fraction,
            "kv_bytes": self.kv_bytes(),
            "full_cache_kv_bytes": full_bytes,
            "peak_kv_bytes": self.peak_kv_bytes,
            "state_bytes": sum(layer.state_bytes() for layer in namm),
            "evicted_tokens": sum(layer.tokens_evicted for layer in namm),
            "evictions": sum(layer.evictions for layer in namm),
        }
