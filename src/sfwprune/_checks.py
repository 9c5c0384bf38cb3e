"""Argument checks in one place: typed config fields, choices, ranges, sparsity lists.

Every check raises ``ValueError("Invalid <name>: <value> (expected ...)")``. A config dataclass
describes each field once with :func:`option` (default, help, choices, bounds); :func:`check_fields`
then validates an instance from its type hints and that metadata, so a new field needs no
validation code of its own.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: Sequence[Any] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with what the CLI and :func:`check_fields` need to know about it.

    ``flag`` renames the CLI flag (default: the field name with ``-``); ``aliases`` are older
    names still accepted, both as config keys and as flags. Example::

        epochs: int = option(10, "passes over the training set", low=1)
    """
    meta = {
        "help": help, "choices": tuple(choices) if choices is not None else None, "low": low,
        "high": high, "low_open": low_open, "high_open": high_open, "flag": flag,
        "aliases": tuple(aliases),
    }  # fmt: skip
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in tuple(allowed):
        shown = ", ".join(str(a) for a in allowed)
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {shown})")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected true or false, a JSON boolean)")
    return value


def check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"Invalid {name}: {value!r} (expected a string)")
    return value


MAX_SEED = 2**32 - 1  # seeds are 32-bit (offsets added to them stay within torch's int64)


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _bounds(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_num(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_num(high)}"
    return ""


def check_int(name: str, value: Any, low: float | None = None, high: float | None = None) -> int:
    """An ``int`` (not a bool) within ``[low, high]``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(
            f"Invalid {name}: {value!r} (expected an integer{_bounds(low, high, False, False)})"
        )
    return value


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number (an int is accepted, a bool is not) within the given bounds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(
            f"Invalid {name}: {value!r} (expected a number{_bounds(low, high, low_open, high_open)})"
        )
    return value


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(hint, False)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def check_value(name: str, value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> None:
    """Check one field value against its type hint and :func:`option` metadata."""
    base, nullable = unwrap_optional(hint)
    choices = meta.get("choices")
    if value is None:
        if nullable or (choices is not None and None in choices):
            return
        raise ValueError(f"Invalid {name}: None (expected a value, not null)")
    if choices is not None:
        check_choice(name, value, choices)
    bounds = {k: meta.get(k) for k in ("low", "high")}
    opens = {k: bool(meta.get(k)) for k in ("low_open", "high_open")}
    if base is bool:
        check_bool(name, value)
    elif base is int:
        check_int(name, value, **bounds)
    elif base is float:
        check_number(name, value, **bounds, **opens)
    elif base is str:
        check_str(name, value)
    elif dataclasses.is_dataclass(base):
        if not isinstance(value, base):
            raise ValueError(f"Invalid {name}: {value!r} (expected a {base.__name__})")
        check_fields(value)
    elif typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        if not isinstance(value, tuple):
            raise ValueError(f"Invalid {name}: {value!r} (expected a list)")
        for v in value:
            check_value(name, v, item, meta)


def check_fields(obj: Any) -> None:
    """Validate every field of the dataclass instance ``obj`` from its hints and metadata."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):  # named as the user knows it: by its flag if renamed
        name = f.metadata.get("flag") or f.name
        check_value(name, getattr(obj, f.name), hints[f.name], f.metadata)


def parse_sparsities(text: str) -> list[float]:
    """``"0,0.5,0.9"`` -> ``[0.0, 0.5, 0.9]``; each in [0, 1]."""
    from .prune.masks import check_sparsity

    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            s = float(item)
        except ValueError:
            raise ValueError(
                f"Invalid sparsity: {item!r} (expected numbers in [0, 1], comma-separated)"
            ) from None
        out.append(check_sparsity(s))  # also refuses NaN
    if not out:
        raise ValueError(f"Invalid sparsities: {text!r} (expected at least one number)")
    return out


def parse_seed(text: str) -> int:
    """A seed in ``[0, MAX_SEED]`` from text."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(
            f"Invalid seed: {text!r} (expected an integer in [0, {MAX_SEED}])"
        ) from None
    return check_int("seed", value, 0, MAX_SEED)


def parse_sparsity(text: str) -> float:
    """One sparsity in [0, 1] from text."""
    values = parse_sparsities(text)
    if len(values) != 1:
        raise ValueError(f"Invalid sparsity: {text!r} (expected one number)")
    return values[0]
