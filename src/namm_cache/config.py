"""The one configuration dataclass of a NAMM: feature constants and eviction settings.

Every default is the value of the paper's released configuration (Sakana AI, "An Evolved Universal
Transformer Memory"), so `NAMMConfig()` reproduces the paper's pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .validation import check_float, check_int, check_mapping, did_you_mean

# Generous ceilings: far above any sensible setting, low enough that a typo cannot ask for a huge tensor.
MAX_HOP_LENGTH = 4096
MAX_RECENCY_DIM = 1024
MAX_TOKEN_COUNT = 2**40  # update_interval, max_tokens: larger than any context window
MAX_NEIGHBOURS = 1024  # a wider window than this keeps whole chapters around one token: not a phrase
PROTECTION = ("sinks", "recent_window")  # tokens kept whatever the policy scores
SPREADING = ("neighbours", "smoothing")  # how scores pass to the tokens around them before selection
SELECTION_RULES = PROTECTION + SPREADING  # what a scorer adds to its scores (`select_tokens`' keywords of these names)


@dataclass
class NAMMConfig:
    """Constants of the feature pipeline and of eviction.

    Attributes:
        n_fft: STFT window length in queries (paper: 32).
        hop_length: STFT hop in queries (paper: 16). Also the length of the tail of attention values each
            token carries across updates, so that frames straddling two updates are computed exactly.
        ema_gamma: per-query decay of the exponential moving average over spectrogram frames (paper: 0.99).
            One frame advances `hop_length` queries, so a frame decays by `ema_gamma ** hop_length`.
        recency_dim: size of the sinusoidal embedding of a token's age (paper: 8). Must be even.
        recency_max_frequency: base of the sinusoidal age embedding (paper: 50000).
        update_interval: scoring and eviction happen once every this many tokens seen (paper: 512). Must
            be a multiple of `hop_length`.
        threshold: tokens whose score is below this are evicted (paper: 0).
        max_tokens: optional hard cap on the tokens each (batch row, KV head) keeps per layer; when more
            tokens pass the threshold, the highest-scoring ones are kept.
        min_fraction: optional floor under the threshold, in (0, 1]: each (batch row, KV head) keeps at least
            `ceil(min_fraction * real tokens seen)` tokens (protected ones first, then the highest-scoring),
            even when fewer pass the threshold. A scorer's threshold keeps a share of the prompt that shrinks as
            the prompt grows (older tokens score lower); the floor bounds that share from below on long prompts.
            `max_tokens` still caps it. Applies on the threshold only (a budget sets its own count).
        sinks: the first this many tokens of each (batch row, KV head) are kept whatever the policy scores
            (attention sinks; default 0: the policy alone decides).
        recent_window: the newest this many positions are kept whatever the policy scores (default 0).
            Protected tokens count toward `max_tokens` and any budget (a cap below their number keeps the
            newest token, then the sinks, then the newest of the window). With both 0 (the paper's setting) the
            scorer decides alone; with them, it decides only what to keep beyond sinks and local context.
        neighbours: each token is ranked by the highest score among itself and this many held tokens on
            either side of it (`namm_cache.selection.spread_scores`), so a kept token keeps its phrase
            (default 0: each token by its own score). Applies to the threshold, the cap and budgets alike.
        smoothing: before `neighbours` spreads them, each token's score is replaced by the mean score of itself
            and this many held tokens on either side (`namm_cache.selection.smooth_scores`), so that a run of
            moderately high scores (a sentence the scorer rates as a whole) outranks a lone high score; the
            threshold then applies to the mean (default 0: each token by its own score). Applies to the
            threshold, the cap and budgets alike.
    """

    n_fft: int = 32
    hop_length: int = 16
    ema_gamma: float = 0.99
    recency_dim: int = 8
    recency_max_frequency: float = 50000.0
    update_interval: int = 512
    threshold: float = 0.0
    max_tokens: int | None = None
    min_fraction: float | None = None
    sinks: int = 0
    recent_window: int = 0
    neighbours: int = 0
    smoothing: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_bins(self) -> int:
        """Number of one-sided STFT frequency bins: `n_fft // 2 + 1`."""
        return self.n_fft // 2 + 1

    @property
    def feature_dim(self) -> int:
        """Size of a token's feature vector: recency embedding + spectrogram bins."""
        return self.recency_dim + self.n_bins

    @property
    def frame_decay(self) -> float:
        """EMA decay applied per spectrogram frame: `ema_gamma ** hop_length`."""
        return self.ema_gamma**self.hop_length

    def validate(self) -> None:
        """Raise `ValueError` naming the fix if the settings cannot work together."""
        # Every field is checked (type, finiteness, range) and stored in its canonical Python type, so a numpy
        # integer or an integral float from a JSON file becomes an int and `to_dict()` stays JSON-clean.
        self.hop_length = check_int("hop_length", self.hop_length, minimum=1, maximum=MAX_HOP_LENGTH)
        self.n_fft = check_int("n_fft", self.n_fft, minimum=2, maximum=2 * MAX_HOP_LENGTH)
        self.ema_gamma = check_float("ema_gamma", self.ema_gamma, above=0.0, maximum=1.0)
        self.recency_dim = check_int("recency_dim", self.recency_dim, minimum=0, maximum=MAX_RECENCY_DIM)
        # The age embedding divides by log(recency_max_frequency): zero or negative is a math domain error.
        self.recency_max_frequency = check_float("recency_max_frequency", self.recency_max_frequency, above=0.0)
        self.update_interval = check_int("update_interval", self.update_interval, minimum=1, maximum=MAX_TOKEN_COUNT)
        # A NaN threshold makes every `score >= threshold` false (everything evicted); inf does the same and -inf
        # keeps everything: neither is a threshold. None means no threshold (only max_tokens applies).
        self.threshold = check_float("threshold", self.threshold, optional=True)
        self.max_tokens = check_int("max_tokens", self.max_tokens, minimum=1, maximum=MAX_TOKEN_COUNT, optional=True)
        self.min_fraction = check_float("min_fraction", self.min_fraction, above=0.0, maximum=1.0, optional=True)
        self.sinks = check_int("sinks", self.sinks, minimum=0, maximum=MAX_TOKEN_COUNT)
        self.recent_window = check_int("recent_window", self.recent_window, minimum=0, maximum=MAX_TOKEN_COUNT)
        self.neighbours = check_int("neighbours", self.neighbours, minimum=0, maximum=MAX_NEIGHBOURS)
        self.smoothing = check_int("smoothing", self.smoothing, minimum=0, maximum=MAX_NEIGHBOURS)
        if self.n_fft != 2 * self.hop_length:
            raise ValueError(
                f"n_fft ({self.n_fft}) must be twice hop_length ({self.hop_length}): each token carries a tail of "
                "hop_length attention values, which is exactly the overlap of two frames."
            )
        if self.min_fraction is not None and self.threshold is None:
            raise ValueError(f"min_fraction ({self.min_fraction}) is a floor under the threshold, and threshold is None: "
                             "without a threshold nothing is evicted below the cap. Set a threshold or drop min_fraction.")
        if self.recency_dim % 2:
            raise ValueError(f"recency_dim must be a non-negative even number, got {self.recency_dim}.")
        if self.update_interval % self.hop_length:
            raise ValueError(
                f"update_interval ({self.update_interval}) must be a positive multiple of hop_length "
                f"({self.hop_length}); try update_interval={max(1, round(self.update_interval / self.hop_length)) * self.hop_length}."
            )

    def replace(self, **changes: Any) -> "NAMMConfig":
        """Return a copy with some fields changed (validated)."""
        _refuse_unknown_fields(changes)
        return dataclasses.replace(self, **changes)

    def selection_rules(self) -> dict[str, int]:
        """`{name: value}` of `SELECTION_RULES` (sinks, recent_window, neighbours, smoothing): what this config adds
        to a policy's scores when tokens are selected, as keywords of `namm_cache.selection.select_tokens`."""
        return {name: getattr(self, name) for name in SELECTION_RULES}

    def own_rule(self, keep_protection: bool = False) -> "NAMMConfig":
        """A copy without `SELECTION_RULES`, as a baseline policy runs by its own rule: no protected tokens
        (`sinks`, `recent_window`; kept with `keep_protection=True`) and no score spreading (`neighbours`,
        `smoothing`). Every other field, the cap included, is unchanged."""
        return self.replace(**{name: 0 for name in (SPREADING if keep_protection else SELECTION_RULES)})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("sinks", "recent_window", "min_fraction", "neighbours", "smoothing"):  # written only when set, so files stay readable by versions without them
            if not data[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "NAMMConfig") -> "NAMMConfig":
        """Build from a dict of fields (e.g. read from JSON); `where` names the source in error messages."""
        data = check_mapping(where, data)
        _refuse_unknown_fields(data)
        return cls(**data)


def _refuse_unknown_fields(names: Any) -> None:
    known = [field.name for field in dataclasses.fields(NAMMConfig)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        hints = "".join(did_you_mean(name, known) for name in unknown)
        raise ValueError(f"Unknown NAMMConfig field(s): {unknown}.{hints} Known fields: {known}.")
