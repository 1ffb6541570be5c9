"""Checking user-given values against the type hints of typed configs.

Values arrive as YAML data or as ``--set KEY=VALUE`` strings; both are checked here against the
dataclass field's annotation, so ``r=sixteen`` fails with a message naming the option and the
type it needs instead of failing deep inside peft.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

import yaml

from .errors import PeftkitError


def parse_scalar(text: str) -> Any:
    """Parse a ``--set`` value the way YAML would (``16`` -> 16, ``true`` -> True, ``[a,b]``)."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def type_name(hint: Any) -> str:
    """A short readable name of a type hint (``int``, ``list of str``, ``one of 'a', 'b'``)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        names = " or ".join(type_name(a) for a in args)
        return names + (" or null" if len(args) < len(typing.get_args(hint)) else "")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        return f"list of {type_name(inner)}"
    return getattr(hint, "__name__", str(hint))


def coerce(value: Any, hint: Any, what: str) -> Any:
    """Return ``value`` converted to ``hint`` or raise ``PeftkitError`` naming ``what``."""
    origin = typing.get_origin(hint)
    bad = PeftkitError(f"{what} must be {type_name(hint)}, got {value!r}")
    if hint is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise bad
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, what)
            except PeftkitError:
                continue
        raise bad
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        if isinstance(value, str):  # "query,value" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [coerce(v, inner, what) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if hint is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value
