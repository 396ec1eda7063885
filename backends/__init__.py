"""Delegates: one module per backend, registered here by name.

A backend sees one method at a time. Adding a delegate means one module with a `Backend` subclass
and one `@register` line; the pipeline never branches on the delegate's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from aot.errors import ConfigError, DelegateUnavailable
from aot.quant import QuantPlan


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str  # why not, or what was found


class Backend:
    name: str = ""
    description: str = ""
    # Quantization schemes (quant.SCHEMES keys) this delegate can lower.
    schemes: tuple[str, ...] = ()

    def availability(self) -> Availability:
        raise NotImplementedError

    def partitioners(self, method_name: str, plan: QuantPlan) -> list:
        """ExecuTorch partitioners for one method of a model quantized by `plan`."""
        raise NotImplementedError

    def require(self) -> None:
        """Raise DelegateUnavailable with the reason when this delegate cannot run here."""
        status = self.availability()
        if not status.ok:
            raise DelegateUnavailable(f"--delegate {self.name} is not available here: {status.reason}")


BACKENDS: dict[str, Callable[[], Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    assert cls.name and cls.name not in BACKENDS, cls
    BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"unknown --delegate '{name}'; choose one of: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]()


from aot.backends import mediatek, qnn, xnnpack  # noqa: E402,F401  (each registers itself)
