"""namm-cache: Neural Attention Memory Models as a drop-in KV cache for Hugging Face causal LMs."""

from .attention import install_attention, register_attention_functions
from .cache import NAMMCache, NAMMLayer
from .config import NAMMConfig
from .scorers import BAMScorer, LinearScorer, MLPScorer, Scorer, attention_mass_scorer
from .spec import CacheSpec

__version__ = "0.1.0"

__all__ = [
    "CacheSpec",
    "NAMMCache",
    "NAMMLayer",
    "NAMMConfig",
    "BAMScorer",
    "MLPScorer",
    "LinearScorer",
    "Scorer",
    "attention_mass_scorer",
    "install_attention",
    "register_attention_functions",
    "__version__",
]
