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
   `refeed` (config `replay_refeed`), the prompt's last tokens run through it too instead of being recorded.

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from namm_cache import NAMMCache, NAMMConfig
from namm_cache.budgets import Budget, ThresholdBudget
from namm_cache.features import log_norms, token_features, with_extra_inputs
from namm_cache.layer import NAMMLayer
from namm_cache.scorers import Scorer
from namm_cache.selection import compaction_indices, select_tokens

from .distill import RecordingPolicy


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
    """

    spectrogram: torch.Tensor | None
    age: torch.Tensor
    positions: torch.Tensor
    arrived: torch.Tensor
    now: int
    log_norms: torch.Tensor | None = None
    features: torch.Tensor | None = None


@dataclass
class PromptRecording:
    """Everything the replay needs of one prompt: its rounds, its keys and values, the answer to score.

    Attributes:
        rounds: the eviction rounds, in order.
        tokens: prompt tokens fed during recording (all but the last and the `refeed` before it).
        queries: `(1, R + A)` the refed prompt tokens, the last prompt token and every answer token but the
            last; the last `A` of them are the answer's queries.
        answer: `(1, A)` the answer tokens.
        cache: the keep-all recording cache (keys and values of the `tokens` fed).
        heads: KV heads per NAMM layer.
    """

    rounds: list[ReplayRound]
    tokens: int
    queries: torch.Tensor
    answer: torch.Tensor
    cache: NAMMCache
    heads: int

    def prepare(self, scorer: Scorer, config: NAMMConfig) -> None:
        """Turn every round's raw spectrograms into scorer features with `scorer`'s normalisation (once)."""
        for round_ in self.rounds:
            if round_.features is None:
                round_.features = token_features(round_.spectrogram, round_.age, scorer.spectrogram_mean,
                                                 scorer.spectrogram_std, config)
                round_.spectrogram = None


@torch.no_grad()
def record_prompt(model: nn.Module, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, config: NAMMConfig,
                  chunk: int, refeed: int = 0) -> PromptRecording:
    """Feed `prompt_ids[:, :-1 - refeed]` through a keep-all observing cache in chunks of `chunk` tokens and
    record every eviction round (see the module docstring). `prompt_ids`, `answer_ids`: `(1, tokens)`.

    `refeed`: at least that many prompt tokens before the last are not recorded but fed again, through each
    member's kept tokens, before the answer (`answer_scores`); the recording stops at the eviction point
    (a multiple of `config.update_interval`) at or before them and runs that point's round, so that no
    recorded token came after the last round. Recorded keys and values were computed with the whole prompt
    in view: a kept token that came after an evicted one still carries what it read there, which the
    member's own cache could not have given it. Refeeding the prompt's end (where the question sits) makes
    those tokens read only what the member kept; eviction rounds inside it are not replayed."""
    if prompt_ids.shape[0] != 1 or answer_ids.shape[0] != 1 or answer_ids.shape[1] < 1 or prompt_ids.shape[1] < 2:
        raise ValueError(f"record_prompt takes one prompt (1, >=2 tokens) and one answer (1, >=1 tokens), got "
                         f"{tuple(prompt_ids.shape)} and {tuple(answer_ids.shape)}.")
    if not 0 <= refeed <= prompt_ids.shape[1] - 2:
        raise ValueError(f"refeed must be in [0, {prompt_ids.shape[1] - 2}] for a prompt of {prompt_ids.shape[1]} tokens "
                         f"(at least one token is recorded), got {refeed}.")
    policy = RecordingPolicy()
    cache = NAMMCache(model=model, config=config.replace(max_tokens=None, threshold=0.0), policy=policy)
    length = prompt_ids.shape[1] - 1 - refeed
    if refeed and length >= config.update_interval:
        length -= length % config.update_interval
    fed = prompt_ids[:, :length]
    for part in fed.split(chunk, dim=1):
        model(input_ids=part.to(model.device), cache=cache, use_cache=True)
    if refeed:  # the round due at the recording's end runs now, as the cache would run it before the next token
        for layer in cache.namm_layers:
            layer.evict_due_rows(now=layer.tokens_seen - 1)
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
    queries = torch.cat([prompt_ids[:, fed.shape[1]:], answer_ids[:, :-1]], dim=1)
    return PromptRecording(rounds=rounds, tokens=fed.shape[1], queries=queries, answer=answer_ids, cache=cache, heads=heads)


@torch.no_grad()
def replay_kept(recording: PromptRecording, scorer: Scorer, config: NAMMConfig, budget: Budget | None = None) -> torch.Tensor:
    """`(L*H, tokens)` bool: the tokens `scorer`'s cache would hold at the end of the recorded prompt.

    Each round scores, per (layer, head) row, the tokens kept so far plus those that arrived since, and
    keeps what `select_tokens` keeps under `config.threshold` / `config.max_tokens` or `budget`."""
    budget = budget if budget is not None else ThresholdBudget()
    rows = recording.rounds[0].age.shape[0] if recording.rounds else len(recording.cache.namm_layers) * recording.heads
    kept = torch.zeros(rows, 0, dtype=torch.bool)
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
        features = with_extra_inputs(scorer.extra_inputs, features, norms, arrived)  # over the tokens held now
        scores = scorer(features, positions, arrived)
        limit = budget.tokens_for(round_.now + 1)  # tokens a row may keep, as NAMMLayer asks (None: threshold)
        if limit is None:
            keep = select_tokens(scores, arrived, positions, threshold=config.threshold, max_tokens=config.max_tokens,
                                 sinks=config.sinks, recent_window=config.recent_window)
        else:
            cap = limit if config.max_tokens is None else min(limit, config.max_tokens)
            keep = select_tokens(scores, arrived, positions, threshold=None, max_tokens=cap,
                                 sinks=config.sinks, recent_window=config.recent_window)
        keep |= slot_valid & ~arrived  # tokens of the chunk past the round's point stay, as in the cache
        kept = torch.zeros(rows, slots, dtype=torch.bool).scatter_(1, order, keep & slot_valid)
    final = torch.ones(rows, recording.tokens, dtype=torch.bool)
    final[:, : kept.shape[1]] = kept
    return final


@torch.no_grad()
def answer_scores(model: nn.Module, recording: PromptRecording, kept: list[torch.Tensor], config: NAMMConfig) -> list[float]:
    """Geometric-mean answer-token probability for each kept set in `kept` (each `(L*H, tokens)` bool), all
    rows of one batched forward of the refed prompt tokens and the answer over the recorded keys and values
    compacted to them."""
    members = len(kept)
    cache = NAMMCache(model=model, config=config.replace(max_tokens=None), policy="full")
    heads = recording.heads
    namm_layers = recording.cache.namm_layers
    stacked = torch.stack(kept)  # (M, L*H, T)
    for i, source in enumerate(namm_layers):
        mask = stacked[:, i * heads:(i + 1) * heads].to(source.keys.device)  # (M, H, T)
        order, slot_valid = compaction_indices(mask.reshape(members * heads, -1))
        order = order.view(members, heads, -1)

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            expanded = tensor.expand(members, *tensor.shape[1:])
            index = order if tensor.dim() == 3 else order.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1])
            return expanded.gather(2, index)

        target: NAMMLayer = cache.layers[source.layer_idx]
        target.install(gather(source.keys), gather(source.values), gather(source.positions),
                       gather(source.token_valid) & slot_valid.view(members, heads, -1), tokens_seen=source.tokens_seen)
    for index, layer in enumerate(recording.cache.layers):
        if not isinstance(layer, NAMMLayer):
            duplicate = copy.deepcopy(layer)
            duplicate.batch_repeat_interleave(members)
            cache.layers[index] = duplicate
    queries = recording.queries.expand(members, -1).to(model.device)
    logits = model(input_ids=queries, cache=cache, use_cache=True).logits[:, -recording.answer.shape[1]:].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    answer = recording.answer.to(logprobs.device).expand(members, -1)
    mean = logprobs.gather(-1, answer.unsqueeze(-1)).squeeze(-1).mean(-1)
    return [math.exp(value) for value in mean.tolist()]


def kept_fraction(kept: torch.Tensor, answer_tokens: int) -> float:
    """Kept real tokens / real tokens seen at the end of the answer, as `NAMMCache.stats()` measures it
    (`kept`: `(L*H, tokens)`; the answer's fed tokens are all held)."""
    rows, tokens = kept.shape
    return (int(kept.sum()) + rows * answer_tokens) / (rows * (tokens + answer_tokens))
