"""lm-eval-harness integration: a registered `namm` model whose every request goes through the evicting cache.

    namm-lm-eval --model namm --model_args pretrained=smollm2-135m-instruct,scorer=namm-cache/keep-all,\
        policy=namm,budget=0.25,update_interval=128,prefill_chunk_size=128 --tasks namm_passkey_1k \
        --include_path $(python -c "import namm_cache.lm_eval_model as m; print(m.TASK_PACK)")

lm-eval's stock `hf` model scores a context with one full forward, which would hide eviction. Here the
context is fed in `prefill_chunk_size` chunks through a fresh `NAMMCache`, so tokens evicted after
earlier chunks really are missing when later tokens (and the continuation) are scored; generation uses
`generate(..., cache=NAMMCache(...), prefill_chunk_size=...)`. Log-likelihood, multiple choice and
rolling log-likelihood all go through `_model_call`, generation through `_model_generate`.
Batches > 1 work: log-likelihood batches are right-padded (padding comes after every real token, so it
cannot change their logits) and generation batches are left-padded with a mask (the cache evicts per row).
Caches that read every layer's key norms (`pooled_key_norm`, `linear_all_layers` scorers) take batch_size=1
only: a left-padded row would evict differently from its prompt alone.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .budgets import parse_budget, refuse_ignored_settings
from .cache import NAMMCache
from .config import NAMMConfig
from .hub import DEFAULT_SCORER, load_scorer
from .offline import OFFLINE_MODELS, ensure_converted
from .policies import ALIASES, POLICIES, build_policy
from .spec import CacheSpec
from .validation import check_int, did_you_mean

TASK_PACK = str(Path(__file__).resolve().parent / "lm_eval_tasks")
CONFIG_ARGS = ("update_interval", "max_tokens", "min_fraction", "threshold", "sinks", "recent_window", "neighbours", "smoothing")
NAMM_ARGS = ("scorer", "policy", "budget", "prefill_chunk_size") + CONFIG_ARGS


@dataclass
class NAMMArgs:
    """The NAMM part of lm-eval's `model_args`, every value checked, before any model is loaded: the cache every
    request gets (its scorer loaded once) and the prefill chunk size."""

    spec: CacheSpec
    prefill_chunk_size: int


def check_namm_args(args: dict[str, Any], other_keys: Any = ()) -> NAMMArgs:
    """Validate the NAMM `model_args` through the same checks as the Python API, or raise one `ValueError`.

    lm-eval has already turned text into values (`"128"` -> 128, `"nan"` -> nan, `"true"` -> True); the
    values are checked as such: `threshold=nan` is refused, and `budget=1` (the text lm-eval turns into the
    integer 1) is refused as ambiguous, exactly like `parse_budget("1")`. The scorer is loaded here, so a
    missing or broken scorer is reported before the model loads. `other_keys`: the remaining model_args,
    checked for near-misses of NAMM argument names (`treshold=`), which HFLM would otherwise swallow.
    """
    hflm_parameters = set(inspect.signature(HFLM.__init__).parameters)
    for key in other_keys:
        hint = did_you_mean(key, NAMM_ARGS)
        if hint and key not in hflm_parameters:
            raise ValueError(f"model_args: unknown argument {key!r}.{hint}")
    policy = args.get("policy", "namm")
    known_policies = sorted(set(POLICIES) | set(ALIASES))
    if not isinstance(policy, str) or ALIASES.get(policy.lower(), policy.lower()) not in POLICIES:
        hint = did_you_mean(str(policy).lower(), known_policies)
        raise ValueError(f"model_args: policy must be one of {known_policies}, got {policy!r}.{hint}")
    policy = ALIASES.get(policy.lower(), policy.lower())
    scorer = args.get("scorer")
    if isinstance(scorer, os.PathLike):
        scorer = os.fspath(scorer)
    if scorer is not None and not isinstance(scorer, str):
        raise ValueError(f"model_args: scorer must be a scorer name or folder, got {scorer!r}.")
    if scorer is not None and policy != "namm":
        raise ValueError(f"scorer= applies to policy=namm only, not {policy!r}.")
    prefill_chunk_size = check_int("prefill_chunk_size", args.get("prefill_chunk_size"), minimum=1, maximum=2**31 - 1, optional=True)
    overrides = {key: args[key] for key in CONFIG_ARGS if key in args}
    budget = parse_budget(args.get("budget"))
    try:  # the Python API's rule: nothing given is silently ignored
        refuse_ignored_settings(budget, overrides, policy == "full")
    except ValueError as error:
        raise ValueError(f"model_args: {error}") from None
    if policy == "namm":
        loaded = load_scorer(scorer or DEFAULT_SCORER)
        config = loaded.config.replace(**overrides)
        spec = CacheSpec(scorer=loaded.scorer, budget=budget, config=config)
    else:
        config = NAMMConfig().replace(**overrides)
        build_policy(policy)  # one that cannot be built from its name alone is refused here; CacheSpec checks the budget
        spec = CacheSpec(policy=policy, budget=budget, config=config)
    return NAMMArgs(spec=spec, prefill_chunk_size=prefill_chunk_size or config.update_interval)


@register_model("namm")
class NAMMLM(HFLM):
    """`HFLM` with a NAMM (or baseline-policy) cache on every request.

    Extra model_args (removed and checked before the model loads): `scorer` (name or path, NAMM policy
    only), `policy` (namm, h2o, key_norm, streaming_llm, snapkv, tova, random, pooled_key_norm, full), `budget` (a token
    count such as 512, a fraction such as 0.25 or 25%, or "threshold"; 1 is refused as ambiguous: write
    100% or 1.0 for a full budget), `update_interval`, `max_tokens`, `min_fraction`, `threshold`, `sinks`, `recent_window`,
    `neighbours`, `smoothing`, `prefill_chunk_size`
    (default: update_interval). `pretrained` also accepts the offline model names of `namm_cache.offline`.
    """

    def __init__(self, pretrained: Any = None, **kwargs: Any):
        namm_args = check_namm_args({key: kwargs.pop(key) for key in NAMM_ARGS if key in kwargs}, other_keys=kwargs)
        if isinstance(pretrained, str) and pretrained in OFFLINE_MODELS:
            pretrained = str(ensure_converted(pretrained))
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        kwargs.setdefault("dtype", "float32")
        super().__init__(pretrained=pretrained, **kwargs)
        self.namm_spec = namm_args.spec
        self.prefill_chunk_size = namm_args.prefill_chunk_size
        self.cache_counters = {"caches": 0, "evicted_tokens": 0, "evictions": 0, "kept_fraction_sum": 0.0}
        self._template = self.make_cache()  # check the model side (and install the attention wrapper) now
        if self._template.policy.pools_every_layer and str(self.batch_size) != "1":
            raise ValueError(
                f"This cache reads every layer's key norms (the pooled_key_norm policy or a linear_all_layers scorer), "
                f"which refuses left-padded generation batches; run it with batch_size=1 (got {self.batch_size})."
            )

    def make_cache(self) -> NAMMCache:
        """A fresh cache for one request; the scorer was loaded once, in `__init__`."""
        return self.namm_spec.build(self.model)

    def _record(self, cache: NAMMCache) -> None:
        stats = cache.stats()
        self.cache_counters["caches"] += 1
        self.cache_counters["evicted_tokens"] += stats["evicted_tokens"]
        self.cache_counters["evictions"] += stats["evictions"]
        kept = stats["mean_kept_fraction"]
        self.cache_counters["kept_fraction_sum"] += 1.0 if kept is None else kept

    @property
    def mean_kept_fraction(self) -> float | None:
        """Mean over the requests served so far of the fraction of real tokens each cache kept (1.0 = none evicted)."""
        caches = self.cache_counters["caches"]
        return self.cache_counters["kept_fraction_sum"] / caches if caches else None

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        if attn_mask is not None or labels is not None:
            raise ValueError("The namm model serves decoder-only (causal) models.")
        cache = self.make_cache()
        logits = []
        with torch.no_grad():
            for chunk in inps.split(self.prefill_chunk_size, dim=1):
                logits.append(self.model(input_ids=chunk, cache=cache, use_cache=True).logits)
        self._record(cache)
        return torch.cat(logits, dim=1)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        cache = self.make_cache()
        generation_kwargs.setdefault("prefill_chunk_size", self.prefill_chunk_size)
        generation_kwargs["cache"] = cache
        generation_kwargs.pop("past_key_values", None)
        output = super()._model_generate(context, max_length, stop, **generation_kwargs)
        self._record(cache)
        return output
