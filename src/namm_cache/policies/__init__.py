"""Eviction policies behind one contract: `score(observation) -> (N, S)`, higher = keep.

`build_policy(name, ...)` builds one by name, so benchmarks and lm-eval switch policy with a string;
`BASELINE_POLICIES` lists the published methods NAMM is compared with (every policy but `namm`, `full`, the
`oracle` ceiling, which needs each prompt's evidence positions: `build_policy("oracle", positions=[...])`, and
this project's own rule `pooled_key_norm`); `COMPARABLE_POLICIES` adds that rule: the policies a benchmark's
`--baselines` accepts.
"""

from __future__ import annotations

from typing import Any

from .base import Observation, Policy
from .full import FullCachePolicy
from .h2o import H2OPolicy
from .key_norm import KeyNormPolicy
from .namm import NAMMPolicy
from .oracle import OraclePolicy
from .pooled_key_norm import PooledKeyNormPolicy
from .random_policy import RandomPolicy
from .snapkv import SnapKVPolicy
from .streaming_llm import StreamingLLMPolicy
from .tova import TOVAPolicy

POLICIES: dict[str, type[Policy]] = {
    "namm": NAMMPolicy,
    "h2o": H2OPolicy,
    "key_norm": KeyNormPolicy,
    "streaming_llm": StreamingLLMPolicy,
    "snapkv": SnapKVPolicy,
    "tova": TOVAPolicy,
    "random": RandomPolicy,
    "pooled_key_norm": PooledKeyNormPolicy,
    "full": FullCachePolicy,
    "oracle": OraclePolicy,
}
ALIASES = {"l2": "key_norm", "knorm": "key_norm", "streamingllm": "streaming_llm", "streaming": "streaming_llm", "full_cache": "full"}

# The methods NAMM is compared with: every registered policy but NAMM itself and the two references, the full
# cache and the oracle (a ceiling told where the evidence is, which no method can know).
BASELINE_POLICIES: tuple[str, ...] = tuple(name for name, cls in POLICIES.items()
                                           if cls not in (NAMMPolicy, FullCachePolicy, OraclePolicy, PooledKeyNormPolicy))
# What a benchmark may run beside NAMM under the same budget: the published baselines and this project's rule.
COMPARABLE_POLICIES: tuple[str, ...] = BASELINE_POLICIES + ("pooled_key_norm",)


def baseline_names() -> list[str]:
    """Registry names of the baseline policies, in registry order (`h2o`, `key_norm`, ...)."""
    return list(BASELINE_POLICIES)


def build_policy(name: str, **kwargs: Any) -> Policy:
    """Build a policy by registry name (`namm` needs `scorer=`); extra keyword arguments go to its constructor."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in POLICIES:
        raise ValueError(f"Unknown policy {name!r}; known: {sorted(POLICIES)} (aliases: {sorted(ALIASES)}).")
    try:
        return POLICIES[key](**kwargs)
    except TypeError as error:
        raise ValueError(f"Bad arguments for policy {key!r}: {error}") from None


__all__ = [
    "Observation",
    "Policy",
    "POLICIES",
    "ALIASES",
    "BASELINE_POLICIES",
    "COMPARABLE_POLICIES",
    "baseline_names",
    "build_policy",
    "NAMMPolicy",
    "H2OPolicy",
    "KeyNormPolicy",
    "StreamingLLMPolicy",
    "SnapKVPolicy",
    "TOVAPolicy",
    "RandomPolicy",
    "FullCachePolicy",
    "OraclePolicy",
    "PooledKeyNormPolicy",
]
