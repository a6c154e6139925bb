"""Replay fitness: one observing full-cache pass per prompt, then every member's evictions replayed on it.

Evaluating a member exactly means feeding the whole prompt through its own cache: a full model pass per
member and prompt, almost all of it spent on tokens whose computation does not depend on the scorer.
The replay fitness pays for one pass per prompt instead and shares it across the population:

1. **Record** (once per prompt). The prompt (all but its last token) goes through a `NAMMCache` that
   observes attention but keeps every token. At each eviction round a recording policy stores every
   token's spectrogram and age, exactly what a scorer reads at that round; the keys and values of
   the whole prompt are kept.
2. **Replay** (per member, cheap). Round by round, the member's scorer scores the tokens its cache would
   hold at that round (the ones it kept so far plus those that arrived since) and the same selection
   rule as the cache (`select_tokens`: threshold, cap or budget, newest token) decides what it keeps.
   Only the scorer runs: no model pass.
3. **Answer** (all members at once). The recorded keys and values, compacted to each member's final
   kept tokens, become the rows of one batched cache; the last prompt token and the answer run through
   it teacher-forced, one forward for the whole population plus the full-cache reference row. With
   `refeed` (config `replay_refeed`), the prompt's last tokens run through it first, the member's rounds
   among them applied where they fall; their recorded keys and values are not used.

What it approximates: in a real run the tokens after an eviction attend over the kept tokens only, so
their keys, values and attention statistics differ from the full-cache pass the replay reads. The answer
gains most from that: the question's tokens, recorded with the whole prompt in view, may already hold what
an evicted needle said. `benchmarks/replay_fidelity.py` measures the optimism that follows, and how much
of it refeeding the prompt's end removes.
The final kept set and the answer's view of it are what the fitness measures; the benchmark
`benchmarks/evolution_throughput.py` reports how the replayed fitness ranks members against the
exact one. Eviction rounds that would fall inside the answer (or the refed tokens) are not replayed.
Only teacher-forced (`logprob`) examples replay; the run evaluates generation-metric examples exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from namm_cache import NAMMCache, NAMMConfig
from namm_cache.budgets import Budget, FractionBudget, ThresholdBudget
from namm_cache.features import LEDGER_INPUTS, log_norms, token_features, with_extra_inputs
from namm_cache.layer import NAMMLayer
from namm_cache.policies import Observation, Policy
from namm_cache.ledger import z_scored_rows
from namm_cache.scorers import Scorer
from namm_cache.selection import compaction_indices, select_tokens

@dataclass(frozen=True)
class RecordingPolicy(Policy):
    """Keeps every token and records, per eviction round, what a NAMM scorer would have read."""

    name: ClassVar[str] = "recording"
    needs: ClassVar[frozenset[str]] = frozenset({"spectrogram"})
    supports_threshold: ClassVar[bool] = True
    records: list = field(default_factory=list, repr=False, compare=False)

    def score(self, observation: Observation) -> torch.Tensor:
        self.records.append((observation.layer_idx, observation))
        return torch.ones(observation.valid.shape, device=observation.keys.device)


@dataclass
class ReplayRound:
    """One eviction round of every NAMM layer of a recorded prompt (rows: layer-major, then KV head).

    Attributes:
        spectrogram: `(L*H, S, n_bins)` raw EMA spectrogram of every token present (before normalisation);
            replaced by `features` `(L*H, S, F)` once `prepare` ran.
        age: `(L*H, S)` newest position minus each token's position.
        positions: `(S,)` absolute positions (the recording keeps every token, so slot = position).
        arrived: `(S,)` bool, tokens up to the round's newest position (later ones of a chunk are not scored).
        now: position of the newest token processed at the round.
        log_norms: `(L*H, S, 2)` log key and value norm of every token (for scorers that read them).
        pooled: `(L*H, S)` each row's pooled key norm (`namm_cache.ledger`: over the rows of its layer and
            the layers before it, or over every layer's, tokens up to `now`), computed by `prepare` for scorers
            that read it; `pooled_input` names which of the two it is.
    """

    spectrogram: torch.Tensor | None
    age: torch.Tensor
    positions: torch.Tensor
    arrived: torch.Tensor
    now: int
    log_norms: torch.Tensor | None = None
    features: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    pooled_input: str | None = None


@dataclass
class PromptRecording:
    """Everything the replay needs of one prompt: its rounds, its keys and values, the answer to score.

    Attributes:
        rounds: the eviction rounds, in order.
        tokens: prompt tokens fed during recording (all but the last).
        queries: `(1, A)` the last prompt token and every answer token but the last (the answer's queries).
        answer: `(1, A)` the answer tokens.
        cache: the keep-all recording cache (keys and values of the `tokens` fed).
        heads: KV heads per NAMM layer.
        fed: `(1, tokens)` the recorded prompt tokens.
        refeed_start: the answer pass feeds the recorded tokens from this position on again, through each
            member's kept tokens (`tokens`: none are).
        layers_at_refeed: the recording's other (non-NAMM) cache layers, as they were at `refeed_start`.
        chunk: the prefill chunk the members' caches are fed in (what the layers after a scoring one have
            seen at its round depends on it: `replay_pooled_all_layers`).
    """

    rounds: list[ReplayRound]
    tokens: int
    queries: torch.Tensor
    answer: torch.Tensor
    cache: NAMMCache
    heads: int
    fed: torch.Tensor | None = None
    refeed_start: int | None = None
    layers_at_refeed: dict[int, Any] | None = None
    chunk: int | None = None

    def prepare(self, scorer: Scorer, config: NAMMConfig) -> None:
        """Turn every round's raw spectrograms into scorer features with `scorer`'s normalisation (once), and
        compute the pooled key norm if `scorer` reads it."""
        pooled_input = next((name for name in scorer.extra_inputs if name in LEDGER_INPUTS), None)
        if pooled_input is not None:
            others = [i for i, layer in enumerate(self.cache.layers) if not isinstance(layer, NAMMLayer)]
            if others:
                raise ValueError(f"The replay fitness cannot give the pooled key norm on this model: layers {others} are not "
                                 "full-attention layers and their keys are not recorded. Use fitness: exact.")
            if pooled_input == "all_layer_key_norm" and self.chunk is None:
                raise ValueError("This recording does not say the chunk its prompt is fed in; record it with record_prompt.")
            for round_ in self.rounds:
                if round_.pooled_input != pooled_input:
                    if pooled_input == "all_layer_key_norm":
                        round_.pooled = replay_pooled_all_layers(round_.log_norms[..., 0], round_.arrived, round_.now,
                                                                 self.chunk, self.heads)
                    else:
                        round_.pooled = replay_pooled(round_.log_norms[..., 0], round_.arrived, self.heads)
                    round_.pooled_input = pooled_input
        for round_ in self.rounds:
            if round_.features is None:
                round_.features = token_features(round_.spectrogram, round_.age, scorer.spectrogram_mean,
                                                 scorer.spectrogram_std, config)
                round_.spectrogram = None


def replay_pooled(log_key_norms: torch.Tensor, arrived: torch.Tensor, heads: int) -> torch.Tensor:
    """`(L*H, S)`: what each NAMM layer's rows read as pooled key norm in a cache of a model whose layers are
    all full-attention ones (`namm_cache.ledger`): layer `i`'s rows read the pooled value over the rows of
    layers `0..i`. `log_key_norms` `(L*H, S)` layer-major; `arrived` `(S,)` the tokens up to the round's point."""
    rows = log_key_norms.shape[0]
    z = z_scored_rows(log_key_norms, arrived)
    sums = z.view(rows // heads, heads, -1).sum(1).cumsum(0)  # (L, S): over the rows of layers 0..i
    means = sums / (heads * torch.arange(1, rows // heads + 1, dtype=z.dtype)).unsqueeze(-1)
    return means.repeat_interleave(heads, dim=0)


def replay_pooled_all_layers(log_key_norms: torch.Tensor, arrived: torch.Tensor, now: int, chunk: int, heads: int) -> torch.Tensor:
    """`(L*H, S)`: what each NAMM layer's rows read as all-layer key norm (`KeyNormLedger.pooled_all_layers`) at a
    round at position `now`, in a cache of a model whose layers are all full-attention ones, fed in chunks of
    `chunk` tokens from position 0. A round whose point ends a chunk runs when the next chunk reaches the layer:
    every layer has seen every token up to `now`. A round inside a chunk runs before the layers after the scoring
    one have seen that chunk: they count for the tokens before it only. Each token's value is the mean of its
    z-scores over the rows that have seen it. `log_key_norms` `(L*H, S)` layer-major; `arrived` `(S,)` the
    tokens up to `now`."""
    rows, tokens = log_key_norms.shape
    layers = rows // heads
    later_seen = now + 1 if (now + 1) % chunk == 0 else now - now % chunk  # tokens the layers after the scoring one hold
    seen_by_later = arrived & (torch.arange(tokens) < later_seen)
    everything = z_scored_rows(log_key_norms, arrived).view(layers, heads, tokens).sum(1)  # (L, S)
    lagged = z_scored_rows(log_key_norms, seen_by_later).view(layers, heads, tokens).sum(1)  # (L, S)
    up_to = everything.cumsum(0)  # rows of layers 0..i
    after = lagged.flip(0).cumsum(0).flip(0) - lagged  # rows of layers i+1..L-1
    index = torch.arange(layers, dtype=everything.dtype).unsqueeze(-1)
    count = heads * ((index + 1) + (layers - 1 - index) * seen_by_later.to(everything.dtype))
    return ((up_to + after) / count).repeat_interleave(heads, dim=0)


@torch.no_grad()
def record_prompt(model: nn.Module, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, config: NAMMConfig,
                  chunk: int, refeed: int = 0) -> PromptRecording:
    """Feed `prompt_ids[:, :-1]` through a keep-all observing cache in chunks of `chunk` tokens and record
    every eviction round (see the module docstring). `prompt_ids`, `answer_ids`: `(1, tokens)`.

    `refeed`: the answer pass (`answer_scores`) feeds the last `refeed` recorded tokens again, through each
    member's kept tokens, and runs the member's eviction rounds that fall among them, before the answer.
    Recorded keys and values were computed with the whole prompt in view: a kept token that came after an
    evicted one still carries what it read there, which the member's own cache could not have given it.
    Refeeding the prompt's end (where the question sits) makes those tokens read only what the member kept."""
    if prompt_ids.shape[0] != 1 or answer_ids.shape[0] != 1 or answer_ids.shape[1] < 1 or prompt_ids.shape[1] < 2:
        raise ValueError(f"record_prompt takes one prompt (1, >=2 tokens) and one answer (1, >=1 tokens), got "
                         f"{tuple(prompt_ids.shape)} and {tuple(answer_ids.shape)}.")
    if not 0 <= refeed <= prompt_ids.shape[1] - 2:
        raise ValueError(f"refeed must be in [0, {prompt_ids.shape[1] - 2}] for a prompt of {prompt_ids.shape[1]} tokens "
                         f"(at least one token is recorded), got {refeed}.")
    policy = RecordingPolicy()
    cache = NAMMCache(model=model, config=config.replace(max_tokens=None, threshold=0.0), policy=policy)
    fed = prompt_ids[:, :-1]
    start = fed.shape[1] - refeed
    layers_at_refeed = None
    bounds = sorted({*range(0, fed.shape[1], chunk), fed.shape[1], *([start] if refeed else [])})
    for part_start, part_end in zip(bounds, bounds[1:]):  # chunks, split where the refeed starts
        model(input_ids=fed[:, part_start:part_end].to(model.device), cache=cache, use_cache=True)
        if refeed and part_end == start:
            layers_at_refeed = {i: copy.deepcopy(layer) for i, layer in enumerate(cache.layers) if not isinstance(layer, NAMMLayer)}
    by_layer: dict[int, list[Any]] = {}
    for layer, observation in policy.records:
        by_layer.setdefault(layer, []).append(observation)
    policy.records.clear()
    layers = [layer.layer_idx for layer in cache.namm_layers]
    counts = {len(by_layer.get(layer, [])) for layer in layers}
    if len(counts) != 1:
        raise RuntimeError(f"NAMM layers recorded different numbers of eviction rounds ({sorted(counts)}).")
    heads = cache.namm_layers[0].keys.shape[1]
    rounds = []
    for index in range(counts.pop()):
        observations = [by_layer[layer][index] for layer in layers]
        first = observations[0]
        positions = first.positions[0].cpu()
        now = int(positions[first.valid[0]].max())
        rounds.append(ReplayRound(
            spectrogram=torch.cat([o.statistics["spectrogram"] for o in observations]).float().cpu(),
            age=torch.cat([o.age for o in observations]).cpu(),
            positions=positions,
            arrived=positions <= now,
            now=now,
            log_norms=torch.cat([log_norms(o.keys, o.values) for o in observations]).cpu(),
        ))
    queries = torch.cat([prompt_ids[:, -1:], answer_ids[:, :-1]], dim=1)
    return PromptRecording(rounds=rounds, tokens=fed.shape[1], queries=queries, answer=answer_ids, cache=cache, heads=heads,
                           fed=fed, refeed_start=start, layers_at_refeed=layers_at_refeed, chunk=chunk)


@torch.no_grad()
def replay_kept(recording: PromptRecording, scorer: Scorer, config: NAMMConfig, budget: Budget | None = None, *,
                steps: bool = False) -> torch.Tensor:
    """`(L*H, tokens)` bool: the tokens `scorer`'s cache would hold at the end of the recorded prompt; with
    `steps`, `(rounds + 1, L*H, tokens)`: what it holds before the first round and after each round (tokens
    not yet fed count as held), which `answer_scores` needs to replay rounds among refed tokens.

    Each round scores, per (layer, head) row, the tokens kept so far plus those that arrived since, and
    keeps what `select_tokens` keeps under `config.threshold` / `config.max_tokens` or `budget`."""
    budget = budget if budget is not None else ThresholdBudget()
    rows = recording.rounds[0].age.shape[0] if recording.rounds else len(recording.cache.namm_layers) * recording.heads
    kept = torch.zeros(rows, 0, dtype=torch.bool)
    history = [torch.ones(rows, recording.tokens, dtype=torch.bool)]
    for round_ in recording.rounds:
        if round_.features is None:
            raise RuntimeError("Call recording.prepare(scorer, config) before replaying.")
        slots = round_.positions.shape[0]
        present = torch.ones(rows, slots, dtype=torch.bool)
        present[:, : kept.shape[1]] = kept
        order, slot_valid = compaction_indices(present)
        positions = round_.positions[order]
        arrived = round_.arrived[order] & slot_valid
        features = round_.features.gather(1, order.unsqueeze(-1).expand(-1, -1, round_.features.shape[-1]))
        norms = round_.log_norms.gather(1, order.unsqueeze(-1).expand(-1, -1, 2)) if scorer.extra_inputs else None
        pooled = round_.pooled.gather(1, order) if round_.pooled is not None else None
        features = with_extra_inputs(scorer.extra_inputs, features, norms, arrived, pooled)  # over the tokens held now
        scores = scorer(features, positions, arrived)
        limit = budget.tokens_for(round_.now + 1)  # tokens a row may keep, as NAMMLayer asks (None: threshold)
        if limit is None:
            floor = None if config.min_fraction is None else FractionBudget(config.min_fraction).tokens_for(round_.now + 1)
            keep = select_tokens(scores, arrived, positions, threshold=config.threshold, max_tokens=config.max_tokens,
                                 min_tokens=floor, **config.selection_rules())
        else:
            cap = limit if config.max_tokens is None else min(limit, config.max_tokens)
            keep = select_tokens(scores, arrived, positions, threshold=None, max_tokens=cap, **config.selection_rules())
        keep |= slot_valid & ~arrived  # tokens of the chunk past the round's point stay, as in the cache
        kept = torch.zeros(rows, slots, dtype=torch.bool).scatter_(1, order, keep & slot_valid)
        held = torch.ones(rows, recording.tokens, dtype=torch.bool)
        held[:, : kept.shape[1]] = kept
        history.append(held)
    return torch.stack(history) if steps else history[-1]


@torch.no_grad()
def answer_scores(model: nn.Module, recording: PromptRecording, kept: list[torch.Tensor], config: NAMMConfig) -> list[float]:
    """Geometric-mean answer-token probability for each member in `kept`, all members rows of one batched cache.

    `kept[m]`: `(L*H, tokens)` bool, what member m holds at the end of the prompt, or `replay_kept(...,
    steps=True)`'s `(rounds + 1, L*H, tokens)`, needed when the recording refeeds tokens among which rounds fall.
    Each row's cache holds the recorded keys and values the member kept before `recording.refeed_start`; the
    refed tokens run through it, each of the member's rounds among them applied where it falls, then the last
    prompt token and the answer, teacher-forced."""
    members = len(kept)
    start = recording.tokens if recording.refeed_start is None else recording.refeed_start
    nows = [round_.now for round_ in recording.rounds]
    inside = [i + 1 for i, now in enumerate(nows) if now >= start]  # history index after each round among refed tokens
    before = sum(now < start for now in nows)  # history index of what is held when the refeed starts
    steps = []
    for member in kept:
        if member.dim() == 2:
            if inside:
                raise ValueError("Rounds fall among the refed tokens: pass replay_kept(..., steps=True) for each member.")
            member = member.unsqueeze(0).expand(len(nows) + 1, *member.shape)
        steps.append(member)
    stacked = torch.stack(steps)  # (M, rounds + 1, L*H, T)
    # A keep-all answer cache: its own rounds (every update_interval) keep every token.
    cache = NAMMCache(model=model, config=config.replace(max_tokens=None, threshold=None, sinks=0, recent_window=0), policy="full")
    heads = recording.heads
    namm_layers = recording.cache.namm_layers
    for i, source in enumerate(namm_layers):
        mask = stacked[:, before, i * heads:(i + 1) * heads, :start].to(source.keys.device)  # (M, H, start)
        order, slot_valid = compaction_indices(mask.reshape(members * heads, -1))
        order = order.view(members, heads, -1)

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            expanded = tensor[:, :, :start].expand(members, *tensor.shape[1:2], start, *tensor.shape[3:])
            index = order if tensor.dim() == 3 else order.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1])
            return expanded.gather(2, index)

        target: NAMMLayer = cache.layers[source.layer_idx]
        target.install(gather(source.keys), gather(source.values), gather(source.positions),
                       gather(source.token_valid) & slot_valid.view(members, heads, -1), tokens_seen=start)
    others = recording.layers_at_refeed if start < recording.tokens else None
    for index, layer in enumerate(recording.cache.layers):
        if not isinstance(layer, NAMMLayer):
            duplicate = copy.deepcopy(others[index] if others is not None else layer)
            duplicate.batch_repeat_interleave(members)
            cache.layers[index] = duplicate
    # The refed tokens, split where the member's rounds fall (a round at `now` runs before token now + 1).
    position = start
    for step in inside:
        now = nows[step - 1]
        if now + 1 > position:
            model(input_ids=recording.fed[:, position:now + 1].expand(members, -1).to(model.device), cache=cache, use_cache=True)
            position = now + 1
        for i, layer in enumerate(cache.namm_layers):
            held = stacked[:, step, i * heads:(i + 1) * heads].to(layer.positions.device)  # (M, H, T)
            slots = layer.positions.clamp(max=held.shape[-1] - 1)
            layer.keep_slots(layer.token_valid & held.gather(2, slots))
    tail = torch.cat([recording.fed[:, position:], recording.queries], dim=1) if position < recording.tokens else recording.queries
    answer_length = recording.answer.shape[1]
    logits = model(input_ids=tail.expand(members, -1).to(model.device), cache=cache, use_cache=True,
                   logits_to_keep=answer_length).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    answer = recording.answer.to(logprobs.device).expand(members, -1)
    mean = logprobs.gather(-1, answer.unsqueeze(-1)).squeeze(-1).mean(-1)
    return [math.exp(value) for value in mean.tolist()]


def kept_fraction(kept: torch.Tensor, answer_tokens: int) -> float:
    """Kept real tokens / real tokens seen at the end of the answer, as `NAMMCache.stats()` measures it
    (`kept`: `(L*H, tokens)`; the answer's fed tokens are all held)."""
    rows, tokens = kept.shape
    return (int(kept.sum()) + rows * answer_tokens) / (rows * (tokens + answer_tokens))
