"""`CacheSpec`: one picklable description of a cache (policy or scorer, budget, settings) that builds it for a model.

lm-eval, the benchmarks, evolution and the held-out evaluation all say what cache they want this way, so the
rule "the namm policy needs a scorer (loaded by name or given), every other policy is built by name" lives in
one place:

    spec = CacheSpec(scorer="namm-cache/smollm2-135m-linear", budget=0.25, overrides={"update_interval": 128})
    cache = spec.build(model)                      # a fresh NAMMCache, as often as needed
    CacheSpec(policy="h2o", budget=0.25).build(model)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from torch import nn

from .budgets import parse_budget, refuse_ignored_settings
from .config import NAMMConfig
from .policies import ALIASES, POLICIES
from .scorers import Scorer


@dataclass(frozen=True, eq=True, unsafe_hash=False)
class CacheSpec:
    """What cache to build; plain data apart from an optional in-memory scorer.

    Attributes:
        policy: `"namm"` (a scorer decides) or a registered policy name (`h2o`, `key_norm`, ..., `full`).
        scorer: for `namm`, a scorer name / folder (loaded once, by `load()` or the first `build()`), a
            `Scorer`, or None (a zero BAM scorer, which keeps everything). Refused for other policies.
        budget: as `NAMMCache(budget=...)`: None (the policy's default), a token count, a fraction, "threshold".
        config: the base `NAMMConfig` (default: the loaded scorer's, else the paper's).
        overrides: `NAMMConfig` fields applied on top of `config` (e.g. `{"update_interval": 128}`).
        policy_kwargs: settings of a named policy (e.g. `{"window": 32}` for snapkv).
    """

    policy: str = "namm"
    scorer: str | Scorer | None = None
    budget: Any = None
    config: NAMMConfig | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    policy_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = ALIASES.get(self.policy.lower(), self.policy.lower()) if isinstance(self.policy, str) else None
        if name not in POLICIES:
            raise ValueError(f"Unknown policy {self.policy!r}; choose from {sorted(POLICIES)} (aliases: {sorted(ALIASES)}).")
        object.__setattr__(self, "policy", name)
        if self.policy != "namm" and self.scorer is not None:
            raise ValueError(f"A scorer only applies to the 'namm' policy, not {self.policy!r}.")
        if self.scorer is not None and not isinstance(self.scorer, (str, Scorer)):
            raise ValueError(f"scorer must be a name, a folder or a Scorer, got {type(self.scorer).__name__}.")
        if self.policy_kwargs and self.policy == "namm":
            raise ValueError("policy_kwargs apply to a policy given by name, not to 'namm' (its settings are the scorer's).")
        if self.config is not None and not isinstance(self.config, NAMMConfig):
            raise ValueError(f"config must be a NAMMConfig, got {type(self.config).__name__}.")
        budget = parse_budget(self.budget)  # refuse a bad budget now, not at the first build
        (self.config or NAMMConfig()).replace(**self.overrides)  # ... and bad settings
        refuse_ignored_settings(budget, self.overrides, self.policy == "full")  # ... and settings nothing would read
        POLICIES[self.policy].check_budget(budget)  # ... and a budget the policy cannot run with
        object.__setattr__(self, "overrides", dict(self.overrides))  # a private copy: the caller's dict may change
        object.__setattr__(self, "policy_kwargs", dict(self.policy_kwargs))

    def load(self) -> "CacheSpec":
        """This spec with its scorer loaded (a name or folder becomes a `Scorer`; its `NAMMConfig` becomes the
        base config unless one was given), so that repeated `build()` calls read no files."""
        if not isinstance(self.scorer, str):
            return self
        from .hub import load_scorer

        loaded = load_scorer(self.scorer)
        return replace(self, scorer=loaded.scorer, config=self.config or loaded.config)

    def namm_config(self) -> NAMMConfig:
        """The settings the built cache runs with (a scorer given by name is loaded to read its config)."""
        spec = self.load()
        return (spec.config or NAMMConfig()).replace(**spec.overrides)

    def build(self, model: nn.Module) -> "NAMMCache":  # noqa: F821 - imported lazily (cache imports policies)
        """A fresh `NAMMCache` for `model`."""
        from .cache import NAMMCache

        spec = self.load()
        config = spec.namm_config()
        if spec.policy == "namm":
            return NAMMCache(model=model, scorer=spec.scorer, config=config, budget=spec.budget)
        return NAMMCache(model=model, policy=spec.policy, budget=spec.budget, config=config,
                         policy_kwargs=dict(spec.policy_kwargs) or None)

    def describe(self) -> str:
        """A short label: `namm@0.25`, `h2o@512`, `namm@threshold`, `full`."""
        if self.policy == "full":
            return "full"
        return f"{self.policy}@{'threshold' if self.budget is None else self.budget}"
