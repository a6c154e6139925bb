"""A warm start for evolution: fit a scorer by gradient descent to where the answer looks, on full-cache runs.

CMA-ES from a zero scorer has to discover from scratch that some old tokens matter more than recent
ones. Here the scorer first learns to predict an importance target it can be taught directly:

1. **Target.** For each training prompt (context, question, answer), a full-cache pass feeds the answer
   tokens teacher-forced and takes the attention their queries pay to every earlier token, averaged over
   each GQA group and over the answer: `(KV heads, tokens)` per full-attention layer. Tokens the answer
   reads (the needle, the key, the sinks) score high; filler scores low.
2. **Inputs.** The same prompt goes through a `NAMMCache` that observes attention but keeps every token.
   At each eviction round a recording policy stores each token's raw spectrogram and age, exactly what
   the scorer would see at that round (it cannot see the question yet when the round falls in the
   context).
3. **Fit.** Normalisation statistics come from the recorded spectrograms (the paper's keep-all
   calibration). A token is a positive of its round when its target is in the top `keep_fraction` of its
   (layer, head) row. The scorer is trained with class-balanced binary cross-entropy (Adam), then its
   read-out bias is shifted so that, on the training rounds, `score >= 0` keeps `keep_fraction` of the
   tokens: the threshold rule then means "keep about that fraction, the ones that look important".

The result is a scorer whose flat parameters can seed CMA-ES, which then optimises the real,
non-differentiable objective.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from namm_cache import NAMMCache, NAMMConfig
from namm_cache.features import log_norms, token_features, with_extra_inputs
from namm_cache.scorers import Scorer
from namm_cache.selection import protected_tokens

from .replay import RecordingPolicy


@dataclass
class Round:
    """One eviction round of one layer, as the scorer saw it, with its importance target.

    Attributes:
        spectrogram: `(H, S, n_bins)` raw EMA spectrogram of each slot (before normalisation).
        age: `(H, S)` newest position minus each slot's position.
        positions: `(H, S)` absolute positions.
        valid: `(H, S)` bool, False for empty slots.
        target: `(H, S)` attention the answer paid to each slot's token (the importance target).
        log_norms: `(H, S, 2)` log key and value norms (read by scorers with `extra_inputs`), or None.
    """

    spectrogram: torch.Tensor
    age: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    target: torch.Tensor
    log_norms: torch.Tensor | None = None


@torch.no_grad()
def answer_attention(model: nn.Module, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, chunk: int) -> dict[int, torch.Tensor]:
    """`{layer: (KV heads, prompt + answer tokens)}`: the attention the answer's queries pay to each token,
    averaged over each GQA group and over the answer tokens (a full cache, eager attention)."""
    from transformers import DynamicCache

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only kernel that returns probabilities
    try:
        cache = DynamicCache(config=model.config)
        for part in prompt_ids[:, :-1].split(chunk, dim=1):
            model(input_ids=part.to(model.device), past_key_values=cache, use_cache=True)
        # The queries that predict the answer: the last prompt token and every answer token but the last.
        queries = torch.cat([prompt_ids[:, -1:], answer_ids[:, :-1]], dim=1)
        out = model(input_ids=queries.to(model.device), past_key_values=cache, use_cache=True, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    text = model.config.get_text_config(decoder=True)
    heads = text.num_key_value_heads
    importance = {}
    for layer, weights in enumerate(out.attentions):
        if weights is None:
            continue
        batch, query_heads, answer, tokens = weights.shape
        grouped = weights[0].float().view(heads, query_heads // heads, answer, tokens)
        importance[layer] = grouped.mean(dim=(1, 2)).cpu()
    return importance


@torch.no_grad()
def collect_rounds(model: nn.Module, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, config: NAMMConfig,
                   chunk: int | None = None) -> list[Round]:
    """Every eviction round of every NAMM layer while `prompt_ids` is fed in chunks, with its target."""
    chunk = chunk or config.update_interval
    importance = answer_attention(model, prompt_ids, answer_ids, chunk)
    policy = RecordingPolicy()
    cache = NAMMCache(model=model, config=config.replace(max_tokens=None), policy=policy)
    for part in prompt_ids.split(chunk, dim=1):
        model(input_ids=part.to(model.device), cache=cache, use_cache=True)
    rounds = []
    for layer, observation in policy.records:
        if layer not in importance:
            continue
        positions = observation.positions.cpu()
        target = importance[layer].gather(1, positions.clamp_max(importance[layer].shape[1] - 1))
        rounds.append(Round(spectrogram=observation.spectrogram.cpu(), age=observation.age.cpu(), positions=positions,
                            valid=observation.valid.cpu(), target=target,
                            log_norms=log_norms(observation.keys, observation.values).cpu()))
    return rounds


def scorer_inputs(scorer: Scorer, round_: Round, config: NAMMConfig) -> torch.Tensor:
    """`(H, S, scorer.input_dim)`: what `scorer` reads at this round (the norms too, if it reads them)."""
    features = token_features(round_.spectrogram, round_.age, scorer.spectrogram_mean, scorer.spectrogram_std, config)
    return with_extra_inputs(scorer.extra_inputs, features, round_.log_norms, round_.valid)


def positives(round_: Round, keep_fraction: float) -> torch.Tensor:
    """`(H, S)` bool: the top `keep_fraction` of each row's valid tokens by target (at least one)."""
    counts = round_.valid.sum(-1, keepdim=True)
    keep = (counts.float() * keep_fraction).ceil().clamp_min(1).long()
    ranked = torch.where(round_.valid, round_.target, torch.full_like(round_.target, float("-inf")))
    order = ranked.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return (rank < keep) & round_.valid


def protected(round_: Round, config: NAMMConfig) -> torch.Tensor:
    """`(H, S)` bool: the round's tokens that `config`'s sinks and recent window keep whatever their score."""
    mask = protected_tokens(round_.valid, round_.positions, sinks=config.sinks, recent_window=config.recent_window)
    return torch.zeros_like(round_.valid) if mask is None else mask


def add_recency_prior(scorer: Scorer, weight: float, config: NAMMConfig) -> int:
    """Lower every score by `weight` x sin(f_min x age), the age embedding's lowest-frequency sine: a
    recency prior on top of whatever the scorer learned (older tokens score lower). The sine rises with
    age up to pi / (2 f_min) tokens (about 5,300 at the default 8 dims and max frequency 50,000); past that
    the prior weakens again. Returns the feature index it weights."""
    if config.recency_dim < 2:
        raise ValueError("A recency prior needs an age embedding (recency_dim >= 2).")
    index = config.recency_dim // 2 - 1  # sines come first, highest frequency first
    with torch.no_grad():
        scorer.readout.weight[0, index] -= weight
    return index


def fit_scorer(scorer: Scorer, rounds: list[Round], config: NAMMConfig, *, keep_fraction: float = 0.25,
               steps: int = 300, lr: float = 1e-2, batch_rounds: int = 8, seed: int = 0,
               progress: bool = True, recency_weight: float = 0.0) -> dict[str, float]:
    """Calibrate `scorer`'s normalisation on `rounds`, fit it to their positives, and set its read-out bias
    so that `score >= 0` keeps `keep_fraction` of the training tokens. Returns the final loss, the kept
    fraction and the agreement (share of kept tokens that are positives) on the training rounds.
    `recency_weight` > 0 adds `add_recency_prior` after the fit, before the bias is set. Tokens the cache
    keeps whatever their score (`config.sinks` / `recent_window`) are left out of the labels, the loss,
    the bias and the reported figures: the scorer decides only the others."""
    if not rounds:
        raise ValueError("No eviction rounds to learn from: give prompts longer than update_interval tokens.")
    if not 0 < keep_fraction < 1:
        raise ValueError(f"keep_fraction must be in (0, 1), got {keep_fraction}.")
    spectra = torch.cat([r.spectrogram[r.valid] for r in rounds]).double()
    scorer.set_normalization(spectra.mean(0).float(), spectra.std(0).float().clamp_min(1e-8))
    inputs = [scorer_inputs(scorer, r, config) for r in rounds]
    # The scorer reads every held token (BAM attends over them, protected ones included), as in the cache; the
    # labels, the loss, the bias and the figures cover only the tokens it decides.
    decided = [r.valid & ~protected(r, config) for r in rounds]
    keep = [i for i, d in enumerate(decided) if d.any()]
    if not keep:
        raise ValueError("Every token is protected (sinks / recent_window): nothing is left for the scorer to decide.")
    inputs, rounds, decided = [inputs[i] for i in keep], [rounds[i] for i in keep], [decided[i] for i in keep]
    labels = [positives(replace(r, valid=d), keep_fraction) for r, d in zip(rounds, decided)]
    optimizer = torch.optim.Adam(scorer.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for _ in tqdm(range(steps), desc="distilling", disable=not progress):
        picked = torch.randperm(len(rounds), generator=generator)[:batch_rounds].tolist()
        loss = 0.0
        for i in picked:
            scores = scorer(inputs[i], rounds[i].positions, rounds[i].valid)[decided[i]]
            label = labels[i][decided[i]].float()
            weight = torch.where(label > 0, (1 - keep_fraction) / keep_fraction, 1.0)  # balance the classes
            loss = loss + F.binary_cross_entropy_with_logits(scores, label, weight=weight)
        loss = loss / len(picked)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
    if recency_weight:
        add_recency_prior(scorer, recency_weight, config)
    with torch.no_grad():
        scores = torch.cat([scorer(x, r.positions, r.valid)[d] for x, r, d in zip(inputs, rounds, decided)])
        shift = torch.quantile(scores, 1 - keep_fraction)  # scores above it: the top keep_fraction
        scorer.readout.bias -= shift
        kept = [(scorer(x, r.positions, r.valid) >= 0) & d for x, r, d in zip(inputs, rounds, decided)]
        kept_total = sum(int(k.sum()) for k in kept)
        agree = sum(int((k & lab).sum()) for k, lab in zip(kept, labels))
        valid_total = sum(int(d.sum()) for d in decided)
    return {"loss": loss_value, "kept_fraction": kept_total / valid_total, "precision": agree / max(kept_total, 1)}


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """`python -m namm_cache.evolution.distill --out DIR`: distil a warm-start scorer on training haystacks."""
    parser = argparse.ArgumentParser(prog="python -m namm_cache.evolution.distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="scorer folder to write (config.json, model.safetensors, card)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", default="passkey,needle", help="training tasks (namm_cache.tasks names)")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--prompts-per-task", type=int, default=6)
    parser.add_argument("--update-interval", type=int, default=128)
    parser.add_argument("--keep-fraction", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", default="bam", choices=["bam", "bam_norms", "linear"],
                        help="scorer kind: the paper's BAM, BAM that also reads key and value norms, or a linear score")
    parser.add_argument("--sinks", type=int, default=0, help="NAMMConfig.sinks of the scorer (protected tokens are not fitted)")
    parser.add_argument("--recent-window", type=int, default=0, help="NAMMConfig.recent_window of the scorer")
    parser.add_argument("--recency-weight", type=float, default=0.0,
                        help="add a recency prior of this weight after the fit (see add_recency_prior); 0: none")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    from namm_cache.scorers import SCORER_KINDS, build_scorer
    from namm_cache.hub import ScorerMetadata, save_scorer
    from namm_cache.tasks import TRAINING_TEXT, build_task, token_ids

    try:
        config = NAMMConfig(update_interval=args.update_interval, sinks=args.sinks, recent_window=args.recent_window)
        tasks = [build_task({"name": name, "tokens": args.tokens, "haystack": TRAINING_TEXT}) for name in args.tasks.split(",")]
        if not (args.recency_weight >= 0 and args.recency_weight < float("inf")):
            raise ValueError(f"--recency-weight must be a finite number >= 0, got {args.recency_weight}")
        for name in ("prompts_per_task", "steps"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        if Path(args.out).exists() and any(Path(args.out).iterdir()):
            raise FileExistsError(f"--out {args.out} is not empty; choose another folder.")
        scorer = build_scorer(args.kind, input_dim=SCORER_KINDS[args.kind].input_dim_for(config), n_bins=config.n_bins)
        if not 0 < args.keep_fraction < 1:
            raise ValueError(f"--keep-fraction must be in (0, 1), got {args.keep_fraction}")
    except (ValueError, FileExistsError) as error:
        print(f"distill: error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from .run import load_model

    model, tokenizer = load_model(args.model)
    rng = random.Random(args.seed)
    examples = [example for task in tasks for example in task.sample(tokenizer, rng, args.prompts_per_task)]
    rounds = []
    for example in tqdm(examples, desc="full-cache runs"):
        rounds += collect_rounds(model, token_ids(tokenizer, example.prompt), token_ids(tokenizer, example.answer), config)
    report = fit_scorer(scorer, rounds, config, keep_fraction=args.keep_fraction, steps=args.steps, seed=args.seed,
                        recency_weight=args.recency_weight)
    metadata = ScorerMetadata(
        base_models=[args.model], training_tasks=[task.name for task in tasks],
        description=(f"Distilled warm start (namm_cache.evolution.distill): fitted to the answer's attention on "
                     f"{len(examples)} training prompts ({TRAINING_TEXT} haystacks), keep fraction {args.keep_fraction}"
                     f"{f', recency prior weight {args.recency_weight:g}' if args.recency_weight else ''}"
                     f"{f', {args.sinks} sinks and {args.recent_window} recent tokens protected (not fitted)' if args.sinks or args.recent_window else ''}; "
                     f"training precision {report['precision']:.3f} at {report['kept_fraction']:.1%} kept. "
                     "A starting point for evolution, not an evaluated scorer."),
        extra={"distill": {**report, "rounds": len(rounds), "steps": args.steps, "seed": args.seed,
                           "recency_weight": args.recency_weight}},
    )
    save_scorer(args.out, scorer, config, metadata)
    print(f"distilled scorer in {args.out}: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
