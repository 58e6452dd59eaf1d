"""The mixer registry: every mixer name attnlab knows, the seven built-in ones and any another package adds.

A mixer is a `Mixer` subclass with a unique `name`. It becomes usable everywhere — layer patterns
(`uniform:<name>`, `hybrid:<name>`, placements, explicit lists), `save_pretrained`/`from_pretrained`,
`generate`, `analyze`, `bench`, `study --mixers` — once it is registered, in one of two ways:

  - in code: decorate the class with `@attnlab.register_mixer`, and import its module before use;
  - from an installed package: declare an entry point in the group `attnlab.mixers` whose value is the
    module that registers it (or the class itself), e.g. in pyproject.toml

        [project.entry-points."attnlab.mixers"]
        slidingwindow = "my_mixer.sliding_window:SlidingWindowAttention"

    attnlab loads the group the first time it meets a name it does not know, so no import is needed.

Names are looked up with `get_mixer`, listed with `mixer_names`; `mixer_package` says which installed
distribution provides a mixer that is not built in (saved in the model's config, so that loading a model
without it can say what to install).
"""

from __future__ import annotations

import functools
import re
from importlib import metadata

from .base import QK_SOURCES, Mixer

ENTRY_POINT_GROUP = "attnlab.mixers"
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")

_registry: dict[str, type[Mixer]] = {}  # name → class, in registration order (the built-in seven first)
_builtin_names: set[str] = set()
_entry_points_loaded = False
_entry_point_errors: dict[str, str] = {}  # entry-point name → why it failed to import


class UnknownMixerError(ValueError):
    """A mixer name that is neither built in, nor registered in code, nor found through an entry point."""


def register_mixer(cls: type[Mixer]) -> type[Mixer]:
    """Add a `Mixer` subclass to the registry under `cls.name`; returns the class (usable as a decorator).

    Registering the same class twice is a no-op; another class under a taken name is refused.
    """
    if not (isinstance(cls, type) and issubclass(cls, Mixer)):
        raise TypeError(f"register_mixer takes a subclass of attnlab.Mixer, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{cls.__qualname__}.name must be a lower-case identifier (letters, digits, _), got {name!r}; "
            "it is what layer patterns and saved configs call the mixer"
        )
    if cls.qk_source not in QK_SOURCES:
        raise ValueError(f"{cls.__qualname__}.qk_source must be one of {QK_SOURCES}, got {cls.qk_source!r}")
    taken = _registry.get(name)
    if taken is not None and taken is not cls:
        raise ValueError(
            f"mixer name {name!r} is taken by {taken.__module__}.{taken.__qualname__}; give "
            f"{cls.__module__}.{cls.__qualname__} another name"
        )
    _registry[name] = cls
    return cls


def register_builtin_mixers(classes: tuple[type[Mixer], ...]) -> tuple[str, ...]:
    """Register attnlab's own mixers (called once, by `attnlab.mixers`); returns their names in order."""
    for cls in classes:
        register_mixer(cls)
        _builtin_names.add(cls.name)
    return tuple(cls.name for cls in classes)


def _load_entry_points() -> None:
    """Import every `attnlab.mixers` entry point once; a class found there is registered if it is not yet. One
    that fails to import does not stop the others: its error is kept for `get_mixer` to report."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as error:  # noqa: BLE001 — whatever the plugin raises, say which entry point it was
            package = entry_point.dist.name if entry_point.dist else "?"
            _entry_point_errors[entry_point.name] = (
                f"the attnlab mixer entry point {entry_point.name} = {entry_point.value!r} (package {package}) "
                f"failed to import: {error}"
            )
            continue
        if isinstance(loaded, type) and issubclass(loaded, Mixer):
            register_mixer(loaded)


def get_mixer(name: str) -> type[Mixer]:
    """The registered class of mixer `name`, loading the entry points once if it is not known yet. A name
    whose entry point failed to import raises that ImportError; any other unknown name an UnknownMixerError
    (which also names the entry points that failed, as the mixer may be one of theirs)."""
    if name not in _registry:
        _load_entry_points()
    if name in _registry:
        return _registry[name]
    if name in _entry_point_errors:
        raise ImportError(_entry_point_errors[name])
    failed = "".join(f"; {message}" for message in _entry_point_errors.values())
    raise UnknownMixerError(
        f"unknown mixer {name!r}; registered mixers: {', '.join(mixer_names())} (a mixer from another "
        f"package needs that package installed, or its module imported, so that it registers itself){failed}"
    )


def is_registered(name: str) -> bool:
    try:
        get_mixer(name)
    except UnknownMixerError:
        return False
    return True


def mixer_names() -> tuple[str, ...]:
    """Every registered mixer name: the built-in seven in the paper's order, then the others as registered."""
    _load_entry_points()
    return tuple(_registry)


def is_builtin(name: str) -> bool:
    return name in _builtin_names


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    """Import name → distributions, read once: it scans every installed distribution (every config of a model
    with a non-built-in mixer asks)."""
    return metadata.packages_distributions()


def mixer_package(name: str) -> str:
    """Where a mixer that is not built in comes from: its installed distribution's name, or else its module."""
    module = get_mixer(name).__module__
    distributions = _packages_distributions().get(module.split(".")[0])
    return distributions[0] if distributions else module
