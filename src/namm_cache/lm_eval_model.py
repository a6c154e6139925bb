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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .cache import NAMMCache
from .offline import OFFLINE_MODELS, ensure_converted

TASK_PACK = str(Path(__file__).resolve().parent / "lm_eval_tasks")
NAMM_ARGS = ("scorer", "policy", "budget", "update_interval", "prefill_chunk_size", "max_tokens", "threshold")


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value


@register_model("namm")
class NAMMLM(HFLM):
    """`HFLM` with a NAMM (or baseline-policy) cache on every request.

    Extra model_args (removed before the model loads): `scorer` (name or path, NAMM policy only),
    `policy` (namm, h2o, key_norm, streaming_llm, snapkv, tova, random, full), `budget` (token count,
    fraction or "threshold"), `update_interval`, `max_tokens`, `threshold`, `prefill_chunk_size`
    (default: update_interval). `pretrained` also accepts the offline model names of `namm_cache.offline`.
    """

    def __init__(self, pretrained: Any = None, **kwargs: Any):
        namm_args = {key: _number(kwargs.pop(key)) for key in NAMM_ARGS if key in kwargs}
        if isinstance(pretrained, str) and pretrained in OFFLINE_MODELS:
            pretrained = str(ensure_converted(pretrained))
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        kwargs.setdefault("dtype", "float32")
        super().__init__(pretrained=pretrained, **kwargs)
        self.namm_scorer = namm_args.pop("scorer", None)
        self.namm_policy = str(namm_args.pop("policy", "namm"))
        self.namm_budget = namm_args.pop("budget", None)
        self.namm_overrides = {k: v for k, v in namm_args.items() if k != "prefill_chunk_size"}
        self.cache_counters = {"caches": 0, "evicted_tokens": 0, "evictions": 0, "kept_fraction_sum": 0.0}
        self._template = self.make_cache()  # validate everything (and install the attention wrapper) now
        self.prefill_chunk_size = int(namm_args.get("prefill_chunk_size") or self._template.namm_config.update_interval)
        if self.prefill_chunk_size < 1:
            raise ValueError("prefill_chunk_size must be >= 1.")

    def make_cache(self) -> NAMMCache:
        if self.namm_policy == "namm":
            cache = NAMMCache.from_pretrained(self.namm_scorer, model=self.model, budget=self.namm_budget, **self.namm_overrides)
        else:
            if self.namm_scorer is not None:
                raise ValueError(f"scorer= applies to policy=namm only, not {self.namm_policy!r}.")
            cache = NAMMCache(model=self.model, policy=self.namm_policy, budget=self.namm_budget, **self.namm_overrides)
        return cache

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
