"""`NAMMCache`: a transformers `Cache` whose full-attention layers score tokens and evict them in `update`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs

from .attention import install_attention
from .budgets import ThresholdBudget, parse_budget, refuse_ignored_settings
from .config import NAMMConfig
from .layer import FeatureObserver, NAMMLayer
from .ledger import KeyNormLedger
from .policies import FullCachePolicy, NAMMPolicy, Policy, build_policy
from .scorers import BAMScorer, Scorer

__all__ = ["NAMMCache", "NAMMLayer"]


def _layer_bytes(layer: Any) -> int:
    if isinstance(layer, NAMMLayer):
        return layer.kv_bytes()
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
        >>> out = model.generate(**inputs, cache=cache, prefill_chunk_size=512, max_new_tokens=64)
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
            wanted = scorer.input_dim_for(namm_config)
            if scorer.input_dim != wanted or scorer.n_bins != namm_config.n_bins:
                extra = f" + {len(scorer.extra_inputs)} {'/'.join(scorer.extra_inputs)}" if scorer.extra_inputs else ""
                raise ValueError(
                    f"The scorer reads {scorer.input_dim} features with {scorer.n_bins} spectrogram bins, but this NAMMConfig "
                    f"gives it {wanted} ({namm_config.recency_dim} recency + {namm_config.n_bins} bins{extra}). "
                    f"Build the scorer with input_dim={wanted}, n_bins={namm_config.n_bins}, or change "
                    "n_fft / recency_dim to match the scorer."
                )
        if scorer is not None and model is not None:
            # Score where the cache lives: a scorer left on the CPU would pull every layer's features off the GPU.
            device = next((p.device for p in model.parameters()), None)
            if device is not None:
                scorer.to(device)
        self.policy = policy if policy is not None else NAMMPolicy(scorer)
        if isinstance(self.policy, FullCachePolicy):  # a full cache never evicts: no cap, no threshold, no floor
            namm_config = namm_config.replace(max_tokens=None, min_fraction=None, threshold=None)
        self.namm_config = namm_config
        self.scorer = scorer
        self.budget = self.policy.check_budget(parse_budget(budget))
        refuse_ignored_settings(self.budget, overrides, isinstance(self.policy, FullCachePolicy))
        self.feature_observer: FeatureObserver | None = None
        layers = []
        for idx, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
            if layer_type == "full_attention":
                layers.append(NAMMLayer(idx, self.namm_config, self.policy, self.budget, observer=self._observe_features))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        super().__init__(layers=layers)
        # Every layer's key norms, for a policy that reads the pooled key norm (namm_cache.ledger).
        self.ledger = KeyNormLedger() if self.policy.reads_pooled_key_norm else None
        for layer in layers:
            if isinstance(layer, NAMMLayer):
                layer.ledger = self.ledger
        for later in [layer for layer in layers if isinstance(layer, NAMMLayer)][1:]:
            later.checks_positions = False  # the first NAMM layer checks each forward's position ids
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
        `HF_HUB_OFFLINE=1`), or a scorer bundled with the package (default: `namm-cache/smollm2-135m-linear`, the evolved scorer).

        `overrides` change runtime settings of the stored `NAMMConfig` (e.g. `update_interval=256`,
        `max_tokens=1024`) without touching the weights.
        """
        from .hub import DEFAULT_SCORER, load_scorer

        parsed = parse_budget(budget)  # a bad budget or a setting it would override is refused before loading
        refuse_ignored_settings(parsed, overrides)
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
        if self.ledger is not None:  # after the layer's checks (a changed batch size is refused there)
            self.ledger.append(layer_idx, key_states)
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
        if self.ledger is not None:
            self.ledger.reset()
        self.peak_kv_bytes = 0
        self._held_bytes = 0
        self._layer_held = [0] * len(self.layers)
        self._last_namm_layer = None

    def crop(self, tokens_to_remove: int) -> None:
        self.namm_layers[0].crop(tokens_to_remove)

    # Batch operations move the ledger's rows with the layers' (beam search, batched generation).
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.ledger is not None:
            self.ledger.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.ledger is not None and self.ledger.real is not None:
            self.ledger.select_rows(torch.arange(self.ledger.real.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.ledger is not None:
            self.ledger.select_rows(indices.nonzero().flatten() if indices.dtype == torch.bool else indices)

    def kept_fraction(self, row: int | None = None) -> float | None:
        """Kept real tokens / real tokens seen over the NAMM layers and their heads, for batch `row` or the
        whole batch (None); None before any NAMM layer has seen a token."""
        namm = [layer for layer in self.namm_layers if layer.is_initialized]
        if not namm:
            return None
        rows = slice(None) if row is None else slice(row, row + 1)
        real_seen = sum(sum(layer.real_tokens_seen[rows]) * layer.keys.shape[1] for layer in namm)
        kept = sum(int(layer.token_valid[rows].sum()) for layer in namm)
        return kept / real_seen if real_seen else 1.0

    def _budget_label(self) -> str:
        """What decides eviction, in words: the budget, or that nothing does (full policy, no threshold, no cap)."""
        if isinstance(self.policy, FullCachePolicy):
            return "none (full cache)"
        cap = [f"at most {self.namm_config.max_tokens} tokens"] if self.namm_config.max_tokens is not None else []
        if isinstance(self.budget, ThresholdBudget):
            rules = ([f"score threshold {self.namm_config.threshold:g}"] if self.namm_config.threshold is not None else []) + cap
            if self.namm_config.min_fraction is not None and self.namm_config.threshold is not None:
                rules.append(f"at least {self.namm_config.min_fraction:.0%} of tokens seen")
            return ", ".join(rules) if rules else "none (threshold=None and no max_tokens: keeps every token)"
        return ", ".join([self.budget.describe(), *cap])  # the cap clamps a budget too

    def stats(self) -> dict[str, Any]:
        """Tokens seen and kept, per layer and head, and the memory held versus a full cache.

        Returns a dict with `policy` (its name), `policy_settings` (its constructor settings), `budget` (what
        decides eviction, in words: e.g. "25% of tokens seen, at most 512 tokens", "score threshold 0"),
        `tokens_seen`, `kept_per_layer` (`{layer: (B, H) list}`, NAMM layers), `mean_kept_fraction` (kept
        real tokens / real tokens seen, NAMM layers), `kv_bytes` (allocated now, all layers),
        `reserved_kv_bytes` (of which free slots reserved for the tokens until each layer's next eviction round),
        `full_cache_kv_bytes` (a DynamicCache at the same point), `peak_kv_bytes`, `state_bytes` (NAMM
        per-token positions, flags and statistics, and the key-norm ledger of a scorer that reads it), `evicted_tokens` and `evictions`.
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
        kept_fraction = self.kept_fraction()
        return {
            "policy": self.policy.name,
            "policy_settings": self.policy.settings(),
            "budget": self._budget_label(),
            "tokens_seen": self.get_seq_length(),
            "kept_per_layer": {layer.layer_idx: layer.kept_per_head().tolist() for layer in namm},
            "mean_kept_fraction": kept_fraction,
            "kv_bytes": self.kv_bytes(),
            "reserved_kv_bytes": sum(layer.reserved_kv_bytes() for layer in namm),
            "full_cache_kv_bytes": full_bytes,
            "peak_kv_bytes": self.peak_kv_bytes,
            "state_bytes": sum(layer.state_bytes() for layer in namm) + (self.ledger.nbytes() if self.ledger is not None else 0),
            "evicted_tokens": sum(layer.tokens_evicted for layer in namm),
            "evictions": sum(layer.evictions for layer in namm),
        }
