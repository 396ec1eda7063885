"""Delegates: one module per backend, registered by name (aot/backends/registry.py).

A backend sees one method at a time. Adding a delegate means one module with a `Backend` subclass
(aot/backends/base.py; static-shape NPUs: aot/backends/static.py) and one `@register` line; the pipeline
never branches on the delegate's name.
"""

from __future__ import annotations

from aot.backends import mediatek, qnn, xnnpack  # noqa: F401  (each registers itself)
from aot.backends.base import Availability, Backend
from aot.backends.registry import BACKENDS, get_backend, register

__all__ = ["Availability", "Backend", "BACKENDS", "get_backend", "register"]
