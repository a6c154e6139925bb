"""The shared number checks: canonical types out, one clear ValueError for anything else."""

from __future__ import annotations

import math

import numpy as np
import pytest

from namm_cache.validation import check_bool, check_choice, check_float, check_int, check_known_keys, check_mapping


@pytest.mark.parametrize("value, expected", [(3, 3), (np.int64(3), 3), (np.int32(-2), -2), (2.0, 2), (np.float64(4.0), 4)])
def test_check_int_accepts_integers_and_integral_values(value, expected):
    result = check_int("n", value)
    assert result == expected and type(result) is int


@pytest.mark.parametrize("value", [2.7, float("nan"), float("inf"), True, np.bool_(False), "3", "abc", None, [], {}, b"1", 1j])
def test_check_int_refuses_everything_else_naming_the_field(value):
    with pytest.raises(ValueError, match=r"^generations must be an integer") as error:
        check_int("generations", value)
    assert "\n" not in str(error.value)


def test_check_int_bounds_and_optional():
    assert check_int("n", None, optional=True) is None
    with pytest.raises(ValueError, match=r"^max_tokens must be an integer or None, in \[1, 8\], got 0.$"):
        check_int("max_tokens", 0, minimum=1, maximum=8, optional=True)
    assert check_int("n", 5, minimum=5, maximum=5) == 5
    with pytest.raises(ValueError, match=r"tokens must be an integer in \[1, inf\), got -100"):
        check_int("tokens", -100, minimum=1)
    with pytest.raises(ValueError, match=r"in \(-inf, 10\], got 11"):
        check_int("n", 11, maximum=10)
    with pytest.raises(ValueError, match="not a whole number"):
        check_int("generations", 2.7)


@pytest.mark.parametrize("value, expected", [(0.5, 0.5), (1, 1.0), (np.float32(0.25), 0.25), (np.int64(7), 7.0), (-3, -3.0)])
def test_check_float_accepts_real_numbers(value, expected):
    result = check_float("x", value)
    assert result == expected and type(result) is float


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float64("nan"), True, "0.5", "nan", None, [], 10**400])
def test_check_float_refuses_non_finite_and_non_numbers(value):
    with pytest.raises(ValueError, match=r"^threshold must be a"):
        check_float("threshold", value)


def test_check_float_bounds_and_opt_ins():
    assert check_float("x", None, optional=True) is None
    assert math.isnan(check_float("x", float("nan"), allow_nan=True))
    with pytest.raises(ValueError, match=r"^threshold must be a number or None, got nan \(NaN is refused"):
        check_float("threshold", float("nan"), optional=True)
    assert check_float("x", float("inf"), allow_inf=True) == float("inf")
    with pytest.raises(ValueError, match=r"ema_gamma must be a number in \(0, 1\], got 1.5"):
        check_float("ema_gamma", 1.5, above=0, maximum=1)
    with pytest.raises(ValueError, match=r"got 0"):
        check_float("ema_gamma", 0, above=0, maximum=1)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        check_float("p", 1.0, minimum=0, below=1)


def test_check_bool_refuses_yaml_words_and_ints():
    assert check_bool("separable", True) is True
    assert check_bool("separable", np.bool_(False)) is False
    for value in ("no", "yes", "false", 0, 1, None, 1.0):
        with pytest.raises(ValueError, match="separable must be true or false"):
            check_bool("separable", value)


def test_check_choice_and_keys_suggest_the_closest_name():
    assert check_choice("kind", "bam", ["bam", "mlp"]) == "bam"
    assert check_choice("n", 1, [1, 2]) == 1
    with pytest.raises(ValueError, match="must be one of"):
        check_choice("n", True, [1, 2])
    with pytest.raises(ValueError, match="Did you mean 'mlp'"):
        check_choice("kind", "mpl", ["bam", "mlp"])
    with pytest.raises(ValueError, match="must be one of"):
        check_choice("kind", [], ["bam", "mlp"])
    with pytest.raises(ValueError, match=r"config.json: unknown setting\(s\) \['hiden_dim'\]. Did you mean 'hidden_dim'\?"):
        check_known_keys("config.json", ["kind", "hiden_dim"], ["kind", "hidden_dim", "input_dim"])
    check_known_keys("config.json", ["kind"], ["kind"])


@pytest.mark.parametrize("value", [None, [], [1, 2], 3, "text"])
def test_check_mapping_names_the_source(value):
    with pytest.raises(ValueError, match="^/tmp/x/config.json must hold an object"):
        check_mapping("/tmp/x/config.json", value)
    assert check_mapping("f", {"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="setting names must be strings"):
        check_mapping("f", {1: 2})
