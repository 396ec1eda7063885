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
    """One delegate: its name, the schemes it takes, whether it runs here, its quantizer and
    partitioners, and what its bundles record."""

    name: str = ""
    description: str = ""
    # Quantization schemes (quant.SCHEMES keys) this delegate can lower; the first is its default.
    schemes: tuple[str, ...] = ()
    # Static-shape delegates (NPUs) get `prefill` (max_seq_len tokens) and `decode` (1 token)
    # methods sharing the KV cache, quantized by their PT2E quantizer; the others get `forward`
    # with a dynamic length, quantized by torchao.
    static_shapes: bool = False
    # KV-cache bit widths the delegate's recipe can store (--kv-bits); empty: not configurable.
    kv_bits: tuple[int, ...] = ()

    def socs(self) -> tuple[str, ...]:
        """Target chips `--soc` takes, the default first; empty when the delegate has none."""
        return ()

    def availability(self) -> Availability:
        raise NotImplementedError

    def quantizer(self, scheme: str, graph, group_size: int, kv_bits: int | None):
        """The PT2E quantizer of a static-shape delegate for one exported graph."""
        raise NotImplementedError(f"{self.name} quantizes with torchao, not PT2E")

    def partitioners(self, method_name: str, plan: QuantPlan, soc: str | None = None) -> list:
        """ExecuTorch partitioners for one method of a model quantized by `plan`."""
        raise NotImplementedError

    def lowering_context(self):
        """A context manager around lowering (local workarounds of ExecuTorch). By default, the
        partitioners' dependency maps as bitsets (backends/dependencies.py)."""
        from aot.backends.dependencies import compact_dependency_viewers

        return compact_dependency_viewers()

    def hold_weights(self, module) -> int:
        """Called on each part of the model as soon as it is quantized (streamed builds): a chance
        to hold its weights more compactly until lowering; returns how many it holds. None by default."""
        return 0

    def forget_held(self) -> None:
        """Drop whatever hold_weights still holds (a build ended before lowering took it)."""

    def bundle_fields(self, cfg) -> dict:
        """What bundle.json records under "target" for a build of `cfg`."""
        fields = {"delegate": self.name, "soc": cfg.soc}
        if self.static_shapes:
            fields.update(prefill_len=cfg.max_seq_len, decode_len=1, kv_bits=cfg.kv_bits)
        return fields

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
