"""One validation layer for the numbers users hand us: configs, scorer `config.json`, lm-eval
`model_args`, evolution configs and CLI flags all go through these functions.

Every check either returns the value in its canonical Python type (`int`, `float`, `bool`) or raises one
`ValueError` whose message names the field, shows the value it got and says what is expected. The rules:

- `bool` is not a number: `True` is refused where an int or a float is asked for, and `0`/`1`/`"no"` are
  refused where a bool is asked for (a YAML `'no'` read as True is a silent wrong result).
- An int field accepts Python and numpy integers, and floats whose value is exactly integral (`2.0` -> 2);
  `2.7` is refused, never truncated.
- A float field accepts any real number (ints included); NaN and +-inf are refused unless the caller allows
  them, because a NaN threshold silently evicts everything.
- Strings are never numbers here: text from a command line or a file is parsed by its reader (argparse,
  lm-eval's argument parser, JSON/YAML) and the parsed value is checked. A string that reaches a number
  field is refused with a message that says so.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = [
    "check_int",
    "check_float",
    "check_bool",
    "check_choice",
    "check_mapping",
    "check_known_keys",
    "did_you_mean",
]


def _show(value: Any) -> str:
    """A short, unambiguous rendering of a value for an error message (strings keep their quotes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_note(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {_show(value)}"
    if isinstance(value, (bool, np.bool_)):
        return f"the bool {value!r}"
    if value is None:
        return "None"
    return f"{_show(value)} ({type(value).__name__})"


def _bound(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range_text(minimum: Any, maximum: Any, above: Any, below: Any) -> str:
    low = f"[{_bound(minimum)}" if minimum is not None else f"({_bound(above)}" if above is not None else "(-inf"
    high = f"{_bound(maximum)}]" if maximum is not None else f"{_bound(below)})" if below is not None else "inf)"
    if low == "(-inf" and high == "inf)":
        return ""
    return f" in {low}, {high}"


def _expected(kind: str, optional: bool, where: str) -> str:
    """'an integer in [1, 8]', 'a number or None', 'an integer or None, in [1, 8]'."""
    if optional:
        return f"{kind} or None" + (f",{where}" if where else "")
    return kind + where


def _check_range(name: str, value: Any, kind: str, minimum: Any, maximum: Any, above: Any, below: Any, original: Any) -> None:
    too_low = (minimum is not None and value < minimum) or (above is not None and value <= above)
    too_high = (maximum is not None and value > maximum) or (below is not None and value >= below)
    if too_low or too_high:
        raise ValueError(f"{name} must be {kind}, got {_show(original)}.")


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    optional: bool = False,
) -> int | None:
    """Return `value` as an `int`, or raise `ValueError` naming `name`.

    Accepts Python/numpy integers and floats with an exactly integral, finite value; refuses bools, strings,
    non-integral or non-finite floats and everything else. `minimum`/`maximum` are inclusive bounds.
    With `optional=True`, `None` is returned as None.
    """
    kind = _expected("an integer", optional, _range_text(minimum, maximum, None, None))
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be {kind}, got None.")
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be {kind}, got {_type_note(value)}.")
    if isinstance(value, numbers.Integral):
        result = int(value)
    elif isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number) or not number.is_integer():
            raise ValueError(f"{name} must be {kind}, got {_show(value)} (not a whole number; it is not rounded for you).")
        result = int(number)
    else:
        raise ValueError(f"{name} must be {kind}, got {_type_note(value)}.")
    _check_range(name, result, kind, minimum, maximum, None, None, value)
    return result


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    allow_nan: bool = False,
    allow_inf: bool = False,
    optional: bool = False,
) -> float | None:
    """Return `value` as a `float`, or raise `ValueError` naming `name`.

    Accepts any real number except bools (Python/numpy ints and floats). `minimum`/`maximum` are inclusive
    bounds, `above`/`below` exclusive ones. NaN is refused unless `allow_nan`, +-inf unless `allow_inf`
    (then the bounds still apply to it). With `optional=True`, `None` is returned as None.
    """
    kind = _expected("a number", optional, _range_text(minimum, maximum, above, below))
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be {kind}, got None.")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {kind}, got {_type_note(value)}.")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {kind}, got {_show(value)} (too large for a float).") from None
    if math.isnan(result):
        if allow_nan:
            return result
        raise ValueError(f"{name} must be {kind}, got nan (NaN is refused: every comparison with it is false).")
    if math.isinf(result) and not allow_inf:
        raise ValueError(f"{name} must be {kind}, got {result} (infinities are refused; use a finite number).")
    _check_range(name, result, kind, minimum, maximum, above, below, value)
    return result


def check_bool(name: str, value: Any) -> bool:
    """Return `value` if it is a real bool (Python or numpy), else raise `ValueError`.

    Strings such as `'no'`/`'false'` and ints such as 0/1 are refused: in YAML and on command lines they are
    the usual source of a flag silently read the wrong way round.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be true or false (a bool), got {_type_note(value)}.")


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`" Did you mean 'x'?"` for the closest known name, or `""` when none is close."""
    matches = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f" Did you mean {matches[0]!r}?" if matches else ""


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return `value` if it is one of `choices`, else raise `ValueError` listing them (and the closest)."""
    choices = list(choices)
    for choice in choices:
        # A bool matches only the same bool (True == 1 must not select the choice 1), and vice versa.
        if isinstance(value, (bool, np.bool_)) != isinstance(choice, bool):
            continue
        try:
            if value == choice:
                return choice
        except Exception:  # a value that cannot even be compared is simply not among the choices
            continue
    hint = did_you_mean(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""
    raise ValueError(f"{name} must be one of {choices}, got {_type_note(value)}.{hint}")


def check_mapping(where: str, value: Any) -> dict:
    """Return `value` if it is a mapping with string keys (e.g. a parsed JSON object), else raise `ValueError`.

    `where` names the source (a file path, 'model_args', ...) so a list, null or number read from a
    config file gives one message naming that file rather than an AttributeError later on.
    """
    if not isinstance(value, Mapping):
        kind = "null" if value is None else type(value).__name__
        raise ValueError(f"{where} must hold an object of named settings ({{\"name\": value, ...}}), got {kind}: {_show(value)}.")
    bad = [key for key in value if not isinstance(key, str)]
    if bad:
        raise ValueError(f"{where}: setting names must be strings, got {_show(bad[0])}.")
    return dict(value)


def check_known_keys(where: str, keys: Iterable[str], known: Iterable[str]) -> None:
    """Raise `ValueError` if any of `keys` is not in `known`, suggesting the closest known name for each."""
    known = list(known)
    unknown = [key for key in keys if key not in known]
    if unknown:
        hints = "".join(did_you_mean(key, known) for key in unknown)
        raise ValueError(f"{where}: unknown setting(s) {sorted(map(str, unknown))}.{hints} Known: {sorted(known)}.")
