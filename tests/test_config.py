"""NAMMConfig checks every field through the shared validation layer (issue 12, items 4 and 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from namm_cache import NAMMConfig


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float64("nan")])
def test_non_finite_threshold_is_refused(value):
    # Item 4: a NaN threshold makes `score >= threshold` false everywhere (everything evicted, silently).
    with pytest.raises(ValueError, match=r"^threshold must be a number or None, got"):
        NAMMConfig(threshold=value)


@pytest.mark.parametrize("value", [0, -1, -50000.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_recency_frequency_is_refused(value):
    # Item 7: recency_max_frequency <= 0 used to be a math domain error at the first eviction.
    with pytest.raises(ValueError, match=r"^recency_max_frequency must be a number in \(0, inf\)"):
        NAMMConfig(recency_max_frequency=value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hop_length": 0}, r"hop_length must be an integer in \[1, 4096\]"),
        ({"hop_length": True}, "hop_length must be an integer.*got the bool True"),
        ({"n_fft": 2.7}, "not a whole number"),
        ({"ema_gamma": 0.0}, r"ema_gamma must be a number in \(0, 1\]"),
        ({"ema_gamma": float("nan")}, "NaN is refused"),
        ({"recency_dim": -2}, "recency_dim must be an integer in"),
        ({"recency_dim": 10**6}, "recency_dim must be an integer in"),
        ({"update_interval": 0}, "update_interval must be an integer in"),
        ({"update_interval": 10**13}, "update_interval must be an integer in"),
        ({"max_tokens": -1}, r"max_tokens must be an integer or None, in \[1,"),
        ({"max_tokens": "abc"}, "got the string 'abc'"),
        ({"threshold": [0]}, "threshold must be a number or None"),
        ({"min_fraction": 0.0}, r"min_fraction must be a number or None, in \(0, 1\]"),
        ({"min_fraction": 0.3, "threshold": None}, "floor under the threshold, and threshold is None"),
        ({"neighbours": -1}, r"neighbours must be an integer in \[0, 1024\]"),
        ({"neighbours": 2.5}, "not a whole number"),
        ({"smoothing": -1}, r"smoothing must be an integer in \[0, 1024\]"),
    ],
)
def test_every_field_has_a_type_and_a_range(changes, message):
    with pytest.raises(ValueError, match=message):
        NAMMConfig(**changes)


def test_numpy_and_integral_values_are_stored_as_python_numbers():
    config = NAMMConfig(update_interval=np.int64(64), max_tokens=np.int32(10), threshold=np.float32(0.5), hop_length=16.0)
    assert type(config.update_interval) is int and type(config.max_tokens) is int and type(config.hop_length) is int
    assert type(config.threshold) is float
    json.dumps(config.to_dict())  # JSON-clean: no numpy scalars leak into config.json


def test_from_dict_refuses_non_objects_and_suggests_field_names():
    for value in ([], None, 3, "x"):
        with pytest.raises(ValueError, match="must hold an object"):
            NAMMConfig.from_dict(value, where="scorer/config.json namm_config")
    with pytest.raises(ValueError, match="Unknown NAMMConfig field.*Did you mean 'update_interval'"):
        NAMMConfig.from_dict({"update_intervall": 64})
    with pytest.raises(ValueError, match="Did you mean 'threshold'"):
        NAMMConfig().replace(treshold=0.5)


def test_neighbours_and_smoothing_are_written_only_when_set_and_read_back():
    for name in ("neighbours", "smoothing"):
        assert name not in NAMMConfig().to_dict()  # files stay readable by versions without the field
        config = NAMMConfig(**{name: 4})
        assert config.to_dict()[name] == 4 and NAMMConfig.from_dict(config.to_dict()) == config


def test_selection_rules_and_own_rule_name_the_four_settings_a_scorer_adds():
    import inspect

    from namm_cache.config import SELECTION_RULES
    from namm_cache.selection import select_tokens

    config = NAMMConfig(update_interval=128, max_tokens=300, sinks=4, recent_window=64, neighbours=2, smoothing=8)
    assert config.selection_rules() == {"sinks": 4, "recent_window": 64, "neighbours": 2, "smoothing": 8}
    assert set(SELECTION_RULES) <= set(inspect.signature(select_tokens).parameters)  # passed on as keywords
    plain = config.own_rule()
    assert plain.selection_rules() == {"sinks": 0, "recent_window": 0, "neighbours": 0, "smoothing": 0}
    assert (plain.max_tokens, plain.update_interval) == (300, 128)  # everything else unchanged
    protected = config.own_rule(keep_protection=True)
    assert protected.selection_rules() == {"sinks": 4, "recent_window": 64, "neighbours": 0, "smoothing": 0}
    assert config.smoothing == 8  # a copy
