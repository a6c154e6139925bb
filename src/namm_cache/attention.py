"""Attention observation: an attention function registered with transformers that wraps eager / sdpa.

transformers calls `cache.update(keys, values, layer_idx)` and then, right after, the attention function of
`config._attn_implementation` with the exact post-RoPE queries and the keys `update` returned. A NAMM layer
hands itself over in `update` (keyed by the very key tensor it returns); the wrapper below picks it up and
only routes: it chooses the attention function (grouped eager attention, or the model's own eager one, when
the layer needs post-softmax probabilities; the base kernel otherwise) and asks the layer to run the chunk
with it (`NAMMLayer.run_attention` builds the mask, observes and evicts). Calls with no hand-over (other
caches, sliding layers) go to the base implementation untouched.

transformers builds one mask for all layers; it cannot describe layers that keep different tokens. The mask
function registered beside the attention function therefore returns an `ObservedMask`: the mask the base
implementation would have built (for layers we do not own) plus the 2D padding mask (for layers we do).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .profiling import phase

if TYPE_CHECKING:  # pragma: no cover
    from .layer import NAMMLayer

SUPPORTED_BASE_IMPLEMENTATIONS = ("sdpa", "eager")
NAMM_PREFIX = "namm_"

_handoff = threading.local()


def hand_over(layer: "NAMMLayer", keys: torch.Tensor) -> None:
    """Called by a NAMM layer at the end of `update`: the next attention call with `keys` is this layer's."""
    _handoff.layer = layer
    _handoff.keys = keys


def take_handover(keys: torch.Tensor) -> "NAMMLayer | None":
    """Return (and clear) the layer that returned exactly `keys` from its last `update`, if any."""
    layer = getattr(_handoff, "layer", None)
    if layer is None or getattr(_handoff, "keys", None) is not keys:
        return None
    _handoff.layer = None
    _handoff.keys = None
    return layer


@dataclass
class ObservedMask:
    """What the NAMM mask function returns in place of a mask.

    Attributes:
        standard: the mask the base implementation would have built (None for sdpa's is_causal fast path).
        padding: the model's 2D attention mask `(batch, tokens so far)`, True/1 = real token, or None.
    """

    standard: Any
    padding: torch.Tensor | None

    # Some callers inspect masks generically; behave like the standard one for those.
    @property
    def shape(self):  # pragma: no cover - defensive
        return None if self.standard is None else self.standard.shape


def _generic_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention with GQA, used only for model families that define no eager function."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


# Keyword arguments of an attention call that do not change its arithmetic (or that are checked below).
_PLAIN_ATTENTION_KWARGS = frozenset({"scaling", "dropout", "position_ids", "cache_position", "use_cache", "output_attentions",
                                     "sliding_window", "softcap", "is_causal", "past_key_values", "cache"})


def grouped_attention_applies(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """True when the call is plain softmax attention, so `grouped_eager_attention` gives what the model's
    own eager function would: no dropout, no logit softcapping, no sliding window, no attention sinks and
    no keyword this module does not know the meaning of. Anything else runs the model's own function."""
    if kwargs.get("dropout", 0.0) or kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        return False
    if getattr(module, "sinks", None) is not None:
        return False
    return all(value is None or name in _PLAIN_ATTENTION_KWARGS for name, value in kwargs.items())


def grouped_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    hidden: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that multiplies each KV head with its whole group of query heads at once.

    The arithmetic of transformers' eager attention (scores in the query dtype, softmax in float32), without
    copying keys and values once per query head, and with probabilities laid out by KV head, which is
    how the cache averages them.

    Args:
        query: `(B, H * G, q, D)`, query head `h * G + g` reading KV head `h` (transformers' GQA order).
        key, value: `(B, H, S, D)`.
        hidden: bool mask `(B, 1 or H, 1, q, S)`, True where a query may not see a slot (broadcast over the
            group), or None. Hidden scores become the dtype's minimum, which is what transformers' additive
            eager masks amount to: their probabilities are exactly 0.

    Returns:
        output `(B, q, H * G, D)` (the layout attention functions return) and float32 probabilities
        `(B, H, G, q, S)`.
    """
    batch, query_heads, q_length, head_dim = query.shape
    heads, slots = key.shape[1], key.shape[2]
    groups = query_heads // heads
    scaling = scaling if scaling is not None else head_dim**-0.5
    scores = torch.matmul(query.reshape(batch, heads, groups * q_length, head_dim), key.transpose(-1, -2))
    scores = scores.view(batch, heads, groups, q_length, slots).mul_(scaling)
    if hidden is not None:
        scores.masked_fill_(hidden, torch.finfo(scores.dtype).min)
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32)
    weights = probabilities if value.dtype == torch.float32 else probabilities.to(value.dtype)
    output = torch.matmul(weights.view(batch, heads, groups * q_length, slots), value)
    output = output.view(batch, query_heads, q_length, value.shape[-1]).transpose(1, 2).contiguous()
    return output, probabilities


_eager_functions: dict[type, Callable] = {}


def model_eager_attention(module: nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file (softcapping, sinks... included)."""
    cls = type(module)
    if cls not in _eager_functions:
        modeling = sys.modules.get(cls.__module__)
        _eager_functions[cls] = getattr(modeling, "eager_attention_forward", None) or _generic_eager_attention
    return _eager_functions[cls]


def _base_attention(name: str) -> Callable | None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return None if name == "eager" else ALL_ATTENTION_FUNCTIONS[name]


def _make_attention_function(base: str) -> Callable:
    def namm_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        observed = attention_mask if isinstance(attention_mask, ObservedMask) else None
        standard = observed.standard if observed is not None else attention_mask
        layer = take_handover(key)
        if layer is None:
            function = _base_attention(base) or model_eager_attention(module)
            with phase("attention"):
                return function(module, query, key, value, standard, **kwargs)

        # Probabilities are only needed when scores depend on them; otherwise run the model's own (fast) kernel.
        grouped = layer.observing and grouped_attention_applies(module, kwargs)
        if grouped:
            attend = grouped_eager_attention
        elif layer.observing:
            attend = model_eager_attention(module)
        else:
            attend = _base_attention(base) or model_eager_attention(module)
        output, weights = layer.run_attention(module, query, attend, grouped=grouped, standard_mask=standard,
                                              padding=observed.padding if observed is not None else None, **kwargs)
        if base != "eager" or weights is None:
            return output, None
        if weights.dim() == 5:  # grouped by KV head: the model's eager layout is (B, query heads, q, S) in the query dtype
            weights = weights.reshape(query.shape[0], query.shape[1], *weights.shape[-2:]).to(query.dtype)
        return output, weights

    namm_attention.__name__ = f"namm_{base}_attention"
    return namm_attention


def _make_mask_function(base: str) -> Callable:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    base_mask = ALL_MASK_ATTENTION_FUNCTIONS[base]

    def namm_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> ObservedMask:
        standard = base_mask(*args, attention_mask=attention_mask, **kwargs)
        return ObservedMask(standard=standard, padding=attention_mask)

    namm_mask.__name__ = f"namm_{base}_mask"
    return namm_mask


_registered = False


def register_attention_functions() -> None:
    """Register `namm_sdpa` and `namm_eager` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for base in SUPPORTED_BASE_IMPLEMENTATIONS:
        AttentionInterface.register(NAMM_PREFIX + base, _make_attention_function(base))
        AttentionMaskInterface.register(NAMM_PREFIX + base, _make_mask_function(base))
    _registered = True


def install_attention(model: nn.Module) -> str:
    """Route the model's attention through the NAMM wrapper around its current eager/sdpa implementation.

    Models keep working with any other cache afterwards: calls without a NAMM hand-over pass straight
    through. Returns the name now set (`namm_sdpa` or `namm_eager`).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError("NAMMCache(model=...) needs a transformers PreTrainedModel.")
    current = config._attn_implementation
    base = current[len(NAMM_PREFIX):] if current and current.startswith(NAMM_PREFIX) else current
    if base not in SUPPORTED_BASE_IMPLEMENTATIONS:
        raise ValueError(
            f"NAMMCache observes attention through eager or sdpa, but this model uses {current!r}. Load it with "
            "attn_implementation='sdpa' (or 'eager'), or call model.set_attn_implementation('sdpa') first."
        )
    register_attention_functions()
    name = NAMM_PREFIX + base
    if current != name:
        model.set_attn_implementation(name)
    return name
