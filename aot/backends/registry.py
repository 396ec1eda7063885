"""Delegates by name: each backend module registers its class with `@register`."""

from __future__ import annotations

from typing import Callable

from aot.backends.base import Backend
from aot.errors import ConfigError

BACKENDS: dict[str, Callable[[], Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    assert cls.name and cls.name not in BACKENDS, cls
    BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"unknown --delegate '{name}'; choose one of: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]()
