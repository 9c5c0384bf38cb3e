"""Command-line flags generated from a config dataclass: one flag per field, help from the
field's :func:`~sfwprune._checks.option` metadata, nested dataclasses flattened.

Flags default to "not given" (``argparse.SUPPRESS``), so only what the user typed overrides a
config file or the defaults; :func:`given` collects those values by field name.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

from .._checks import unwrap_optional


def _leaf_fields(cls: type) -> Iterator[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name])
        else:
            yield f, hints[f.name]


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else None


def _none_or(parse: type) -> Any:
    def convert(text: str) -> Any:
        return None if text == "none" else parse(text)

    convert.__name__ = parse.__name__  # argparse's "invalid <name> value" message
    return convert


def _comma_list(parse: type) -> Any:
    def convert(text: str) -> tuple:
        return tuple(parse(item) for item in text.split(","))

    convert.__name__ = f"comma-separated {parse.__name__}"
    return convert


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per field of ``cls`` (and of the dataclasses it nests)."""
    for f, hint in _leaf_fields(cls):
        meta = f.metadata
        base, _ = unwrap_optional(hint)
        names = [meta.get("flag") or f.name, *meta.get("aliases", ())]
        flags = ["--" + n.replace("_", "-") for n in names]
        choices = meta.get("choices")
        text = meta.get("help", "")
        if choices is not None:
            text += f" ({' | '.join('none' if c is None else str(c) for c in choices)})"
        default = _default(f)
        if "default" not in text:  # a field may say its default itself ("None: ...")
            text += f"; default {'none' if default is None else default}"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:  # "0.9,0.95" -> (0.9, 0.95); checked later
            kw["type"] = _comma_list(typing.get_args(base)[0])
            kw["metavar"] = names[0].upper()
        else:
            parse = base if base in (int, float, str) else str
            kw["type"] = _none_or(parse) if choices is not None and None in choices else parse
            kw["metavar"] = names[0].upper()
        parser.add_argument(*flags, **kw)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of ``cls``'s flags that were given on the command line, by field name
    (``OptimizerSpec.name`` comes back under its flag's name, ``optimizer``)."""
    out = {}
    for f, _ in _leaf_fields(cls):
        if hasattr(args, f.name):
            out[f.metadata.get("flag") or f.name] = getattr(args, f.name)
    return out
