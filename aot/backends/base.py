"""The Backend interface every delegate implements (registered in aot/backends/__init__.py)."""

from __future__ import annotations

import contextlib

from dataclasses import dataclass

from aot.backends.dependencies import compact_dependency_viewers
from aot.errors import DelegateUnavailable
from aot.families import Program
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
    # Static-shape delegates (NPUs, aot/backends/static.py) get `prefill` (max_seq_len tokens) and
    # `decode` (1 token) methods sharing the KV cache, quantized by their PT2E quantizer; the
    # others get the family's methods with dynamic lengths, quantized by torchao as weights load.
    static_shapes: bool = False
    quantizes_at_load: bool = True  # the family applies the torchao plan while loading
    # KV-cache bit widths the delegate's recipe can store (--kv-bits); empty: not configurable.
    kv_bits: tuple[int, ...] = ()
    # --kv-cache values the delegate takes, the default first (static-shape delegates: their
    # kv_bits as int8/int16, default the activations' width); empty: not configurable.
    kv_caches: tuple[str, ...] = ()

    def socs(self) -> tuple[str, ...]:
        """Target chips `--soc` takes, the default first; empty when the delegate has none."""
        return ()

    def availability(self) -> Availability:
        raise NotImplementedError

    def input_files(self, cfg, src) -> list:
        """Files the backend's own steps read, hashed as build inputs (none by default)."""
        return []

    def prepare(self, program: Program, model, src, cfg, stages) -> Program:
        """The backend's step between loading and export: the family's program as it is by
        default; static-shape delegates replace it (aot/backends/static.py)."""
        return program

    def partitioners(self, method_name: str, plan: QuantPlan, soc: str | None = None) -> list:
        """ExecuTorch partitioners for one method of a model quantized by `plan`."""
        raise NotImplementedError

    def lowering_context(self):
        """A context manager around lowering (local workarounds of ExecuTorch). By default, the
        partitioners' dependency maps as bitsets (aot/backends/dependencies.py)."""
        return compact_dependency_viewers()

    def hold_weights(self, module) -> int:
        """Called on each part of the model as soon as it is quantized (streamed builds): a chance
        to hold its weights more compactly until lowering; returns how many it holds. None by default."""
        return 0

    def forget_held(self) -> None:
        """Drop whatever hold_weights still holds (a build ended before lowering took it)."""

    def keeping_weights(self):
        """A context manager around a lowering after which the eager model's weights are exported
        again (a bundle's next program over the same foundation): lowering must not free them.
        Nothing to do by default."""
        return contextlib.nullcontext()

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


