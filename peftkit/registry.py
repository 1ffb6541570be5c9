"""Registries of named plugins: built-ins register with a decorator, third parties with entry points.

One mechanism (``Registry``) serves strategies (here) and task types (``peftkit.tasks``). A
third-party distribution adds either without editing peftkit by declaring, in its own
``pyproject.toml``::

    [project.entry-points."peftkit.strategies"]
    bitfit = "peftkit_bitfit:BitFit"

    [project.entry-points."peftkit.tasks"]
    text-regression = "peftkit_bitfit.regression:TextRegression"

The entry point names a subclass of the registry's base class (registered on load if its module
did not already decorate it). ``PEFTKIT_DISABLE_PLUGINS=1`` skips plugins, for reproducible runs. A
plugin that fails to load is reported by name and entry point; everything else keeps working.

Nothing here imports torch: strategy and task modules import it lazily, so ``peftkit list`` stays fast.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import ClassVar, Generic, Protocol, TypeVar, cast

from .errors import PeftkitError, did_you_mean, first_line
from .strategies.base import Strategy

DISABLE_PLUGINS_ENV = "PEFTKIT_DISABLE_PLUGINS"


class Registrable(Protocol):
    """What a registry needs of a class: a lower-case ``name``, a one-line ``description`` and
    optional ``aliases`` (``Strategy`` and ``Task`` declare them as class attributes)."""

    name: ClassVar[str]
    description: ClassVar[str]


T = TypeVar("T", bound=type[Registrable])


def plugins_disabled() -> bool:
    """Whether ``PEFTKIT_DISABLE_PLUGINS`` turns entry-point plugins off."""
    return os.environ.get(DISABLE_PLUGINS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Family(Generic[T]):
    """Names under one prefix (``peft:``) whose classes are made on first use (``Registry.get``)
    rather than registered one by one: ``resolve`` gets the part after the prefix (``ia3``) and
    returns its class, or raises ``PeftkitError`` for a name the family does not have."""

    prefix: str
    resolve: Callable[[str], T]
    description: str  # one line for ``peftkit list``: what the family's names are


class Registry(Generic[T]):
    """Classes of one kind (``base``) by name and alias: the built-ins imported from
    ``builtin_modules`` and the plugins of entry-point ``group``, both loaded on first use; and
    families of names under a prefix (``register_family``), resolved when asked for."""

    def __init__(self, kind: str, base: type, group: str, builtin_modules: tuple[str, ...]) -> None:
        self.kind, self.base, self.group, self.builtin_modules = kind, base, group, builtin_modules
        self._classes: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._plugin_errors: dict[str, str] = {}
        self._plugins_loaded: dict[str, str] = {}
        self._families: dict[str, Family[T]] = {}
        self._resolved: dict[str, T] = {}
        self._loaded = False

    def register_family(self, prefix: str, resolve: Callable[[str], T], description: str) -> None:
        """Add a family: every name ``PREFIX REST`` is looked up by ``resolve(REST)`` on first use
        (then kept). For a catalogue too large, or too costly to enumerate, to register class by
        class at import: a resolver may import heavy libraries, registering it imports nothing.
        A prefix ends with ``:`` and may not start a registered name; it is registered once."""
        if not prefix.endswith(":") or prefix != prefix.strip().lower():
            raise ValueError(f"{self.kind} family prefix {prefix!r} must be lower case and end with ':'")
        if prefix in self._families or any(name.startswith(prefix) for name in self._classes):
            raise ValueError(f"{self.kind} family prefix {prefix!r} is already taken")
        self._families[prefix] = Family(prefix, resolve, description)

    def families(self) -> dict[str, Family[T]]:
        """Every registered family by prefix."""
        self.ensure_loaded()
        return dict(sorted(self._families.items()))

    def _from_family(self, key: str) -> T | None:
        """The class of ``key`` from the family its prefix names (made once, then kept), or None
        where no family's prefix starts it."""
        prefix = next((p for p in self._families if key.startswith(p)), None)
        if prefix is None:
            return None
        if key not in self._resolved:
            self._resolved[key] = self._families[prefix].resolve(key[len(prefix) :])
        return self._resolved[key]

    def register(self, cls: T) -> T:
        """Class decorator: add ``cls`` under ``cls.name`` (and its ``aliases``). A name or alias
        that is already taken is refused rather than overwritten, so a plugin cannot silently
        replace a built-in."""
        kind = self.kind
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a peftkit {self.base.__name__} subclass")
        if not cls.name or cls.name != cls.name.strip().lower():
            raise ValueError(f"{kind} {cls.__qualname__} needs a lower-case `name`")
        if not cls.description:
            raise ValueError(f"{kind} {cls.name!r} needs a one-line `description`")
        if any(cls.name.startswith(prefix) for prefix in self._families):
            raise ValueError(f"{kind} name {cls.name!r} is in a family's prefix; the family resolves it")
        aliases = tuple(getattr(cls, "aliases", ()))
        for key in (cls.name, *aliases):
            owner = self._classes.get(key) or self._classes.get(self._aliases.get(key, ""))
            if owner is not None and owner is not cls:
                raise ValueError(
                    f"{kind} name {key!r} is already registered by {owner.__module__}.{owner.__qualname__}"
                )
        self._classes[cls.name] = cls
        for alias in aliases:
            self._aliases[alias] = cls.name
        return cls

    def unregister(self, name: str) -> None:
        """Remove a class (for tests of the registry itself)."""
        cls = self._classes.pop(name, None)
        if cls is not None:
            for alias in getattr(cls, "aliases", ()):
                self._aliases.pop(alias, None)

    def _load_plugins(self) -> None:
        if plugins_disabled():
            return
        for ep in entry_points(group=self.group):
            where = f"{ep.name} = {ep.value}"
            try:
                obj = ep.load()
                if not (isinstance(obj, type) and issubclass(obj, self.base)):
                    raise TypeError(f"{obj!r} is not a peftkit {self.base.__name__} subclass")
                cls = cast(T, obj)
                if self._classes.get(cls.name) is not cls:
                    self.register(cls)
                self._plugins_loaded[cls.name] = where
            except Exception as exc:  # a broken plugin must not take the others down
                self._plugin_errors[ep.name] = (
                    f"plugin {ep.name!r} (entry point '{where}' in group {self.group}) "
                    f"failed to load: {type(exc).__name__}: {first_line(exc)}"
                )

    def ensure_loaded(self) -> None:
        """Import the built-ins and the plugins once."""
        if self._loaded:
            return
        self._loaded = True
        for module in self.builtin_modules:
            importlib.import_module(module)
        self._load_plugins()

    def available(self) -> dict[str, T]:
        """Every registered class by name, sorted."""
        self.ensure_loaded()
        return dict(sorted(self._classes.items()))

    def plugin_errors(self) -> list[str]:
        """One line per plugin that failed to load."""
        self.ensure_loaded()
        return list(self._plugin_errors.values())

    def loaded_plugins(self) -> dict[str, str]:
        """Name -> entry point, for every plugin that loaded."""
        self.ensure_loaded()
        return dict(self._plugins_loaded)

    def get(self, name: str) -> T:
        """Look a class up by name or alias, case and ``-`` / ``_`` aside (``head-only`` finds
        ``head_only``, ``causal_lm`` finds ``causal-lm``)."""
        self.ensure_loaded()
        key = name.strip().lower()
        key = self._aliases.get(key, key)
        candidates = (key, key.replace("-", "_"), key.replace("_", "-"))
        for candidate in candidates:
            if candidate in self._classes:
                return self._classes[candidate]
        member = self._from_family(key)
        if member is not None:
            return member
        for plugin, message in self._plugin_errors.items():
            if plugin in (name, *candidates):
                raise PeftkitError(message)
        hint = did_you_mean(name, [*self._aliases, *self._classes])  # a canonical name wins over its alias
        families = [f"{prefix}NAME ({f.description})" for prefix, f in sorted(self._families.items())]
        raise PeftkitError(
            f"unknown {self.kind} {name!r}{hint}; available: {', '.join([*sorted(self._classes), *families])}"
        )


# -- strategies ---------------------------------------------------------------------------------

ENTRY_POINT_GROUP = "peftkit.strategies"

# Modules of the built-in strategies; importing one runs its @register_strategy.
BUILTIN_MODULES = (
    "peftkit.strategies.full",
    "peftkit.strategies.head_only",
    "peftkit.strategies.gradual_unfreeze",
    "peftkit.strategies.lora",
    "peftkit.strategies.adapter",
    "peftkit.strategies.prefix",
    "peftkit.strategies.peft_methods",
)

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", Strategy, ENTRY_POINT_GROUP, BUILTIN_MODULES)

S = TypeVar("S", bound=type[Strategy])


def register_strategy(cls: S) -> S:
    """Class decorator: add a ``Strategy`` subclass to the registry under ``cls.name``; a name
    (or alias) already taken is refused."""
    STRATEGIES.register(cls)
    return cls


def register_strategy_family(prefix: str, resolve: Callable[[str], type[Strategy]], description: str) -> None:
    """Add a family of strategies named ``PREFIX NAME`` (``peft:ia3``), each made by
    ``resolve(NAME)`` when first asked for (``Registry.register_family``). Built-ins and plugins
    call it when their module is imported."""
    STRATEGIES.register_family(prefix, resolve, description)


def strategy_families() -> dict[str, Family[type[Strategy]]]:
    """Every strategy family by prefix (``peft:``)."""
    return STRATEGIES.families()


def unregister_strategy(name: str) -> None:
    """Remove a strategy (for tests of the registry itself)."""
    STRATEGIES.unregister(name)


def ensure_loaded() -> None:
    """Import the built-in strategies and the plugins once."""
    STRATEGIES.ensure_loaded()


def available() -> dict[str, type[Strategy]]:
    """Every registered strategy by name, sorted."""
    return STRATEGIES.available()


def plugin_errors() -> list[str]:
    """One line per strategy plugin that failed to load."""
    return STRATEGIES.plugin_errors()


def loaded_plugins() -> dict[str, str]:
    """Strategy name -> entry point, for every plugin that loaded."""
    return STRATEGIES.loaded_plugins()


def get_strategy(name: str) -> type[Strategy]:
    """Look a strategy up by name or alias (``head-only`` finds ``head_only``)."""
    return STRATEGIES.get(name)
