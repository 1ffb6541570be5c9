"""The strategy registry: built-ins register with a decorator, third parties with entry points.

A third-party distribution adds a strategy without editing peftkit by declaring, in its own
``pyproject.toml``::

    [project.entry-points."peftkit.strategies"]
    bitfit = "peftkit_bitfit:BitFit"

The entry point names a ``Strategy`` subclass (registered on load if its module did not already
decorate it). ``PEFTKIT_DISABLE_PLUGINS=1`` skips plugins, for reproducible runs. A plugin that fails
to load is reported by name and entry point; every other strategy keeps working.

Nothing here imports torch: strategy modules import it lazily, so ``peftkit list`` stays fast.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import TypeVar

from .errors import PeftkitError, first_line
from .strategies.base import Strategy

ENTRY_POINT_GROUP = "peftkit.strategies"
DISABLE_PLUGINS_ENV = "PEFTKIT_DISABLE_PLUGINS"

# Modules of the built-in strategies; importing one runs its @register_strategy.
BUILTIN_MODULES = (
    "peftkit.strategies.full",
    "peftkit.strategies.head_only",
    "peftkit.strategies.gradual_unfreeze",
    "peftkit.strategies.lora",
    "peftkit.strategies.adapter",
    "peftkit.strategies.prefix",
)

_strategies: dict[str, type[Strategy]] = {}
_aliases: dict[str, str] = {}
_plugin_errors: dict[str, str] = {}
_plugins_loaded: dict[str, str] = {}
_loaded = False

S = TypeVar("S", bound=type[Strategy])


def register_strategy(cls: S) -> S:
    """Class decorator: add a ``Strategy`` subclass to the registry under ``cls.name``.

    A name (or alias) that is already taken is refused rather than overwritten, so a plugin cannot
    silently replace a built-in.
    """
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"{cls!r} is not a peftkit Strategy subclass")
    if not cls.name or cls.name != cls.name.strip().lower():
        raise ValueError(f"strategy {cls.__qualname__} needs a lower-case `name`")
    if not cls.description:
        raise ValueError(f"strategy {cls.name!r} needs a one-line `description`")
    for key in (cls.name, *cls.aliases):
        owner = _strategies.get(key) or _strategies.get(_aliases.get(key, ""))
        if owner is not None and owner is not cls:
            raise ValueError(
                f"strategy name {key!r} is already registered by {owner.__module__}.{owner.__qualname__}"
            )
    _strategies[cls.name] = cls
    for alias in cls.aliases:
        _aliases[alias] = cls.name
    return cls


def unregister_strategy(name: str) -> None:
    """Remove a strategy (for tests of the registry itself)."""
    cls = _strategies.pop(name, None)
    if cls is not None:
        for alias in cls.aliases:
            _aliases.pop(alias, None)


def _load_plugins() -> None:
    if os.environ.get(DISABLE_PLUGINS_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        where = f"{ep.name} = {ep.value}"
        try:
            obj = ep.load()
            if not (isinstance(obj, type) and issubclass(obj, Strategy)):
                raise TypeError(f"{obj!r} is not a peftkit Strategy subclass")
            if _strategies.get(obj.name) is not obj:
                register_strategy(obj)
            _plugins_loaded[obj.name] = where
        except Exception as exc:  # a broken plugin must not take the others down
            _plugin_errors[ep.name] = (
                f"plugin {ep.name!r} (entry point '{where}' in group {ENTRY_POINT_GROUP}) "
                f"failed to load: {type(exc).__name__}: {first_line(exc)}"
            )


def ensure_loaded() -> None:
    """Import the built-in strategies and the plugins once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    _load_plugins()


def available() -> dict[str, type[Strategy]]:
    """Every registered strategy by name, sorted."""
    ensure_loaded()
    return dict(sorted(_strategies.items()))


def plugin_errors() -> list[str]:
    """One line per plugin that failed to load."""
    ensure_loaded()
    return list(_plugin_errors.values())


def loaded_plugins() -> dict[str, str]:
    """Strategy name -> entry point, for every plugin that loaded."""
    ensure_loaded()
    return dict(_plugins_loaded)


def get_strategy(name: str) -> type[Strategy]:
    """Look a strategy up by name or alias (``head-only`` finds ``head_only``)."""
    ensure_loaded()
    key = name.strip().lower()
    key = _aliases.get(key, key)
    if key not in _strategies:
        key = key.replace("-", "_")
    if key in _strategies:
        return _strategies[key]
    for plugin, message in _plugin_errors.items():
        if plugin in (name, key):
            raise PeftkitError(message)
    raise PeftkitError(f"unknown strategy {name!r}; available: {', '.join(sorted(_strategies))}")
