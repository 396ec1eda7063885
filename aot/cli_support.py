"""What every `aot` command shares: the consoles, the --json/--debug options, the error
boundary (one line and an exit code), and flag defaults read from the config dataclasses."""

from __future__ import annotations

import importlib
import json
import warnings
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from aot import __version__
from aot.errors import EXIT_INTERRUPTED, AotError
from aot.native import quiet_libraries

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JSON_OPT = typer.Option(False, "--json", help="Print the result as JSON on stdout (progress stays on stderr).")
DEBUG_OPT = typer.Option(False, "--debug", help="Show full tracebacks and library warnings.")


class _Default:
    """A flag's default: a config dataclass field's, read only when the flag is left out (click calls
    it) or --help shows it (str), so the torch-importing config modules load then, not for `aot --help`."""

    def __init__(self, where: str, field: str):  # where: "module:Class"
        self.where, self.field = where, field

    def __call__(self):
        module, _, cls = self.where.partition(":")
        return getattr(importlib.import_module(module), cls).__dataclass_fields__[self.field].default

    def __str__(self) -> str:
        return str(self())


class _Defaults:
    """`DEVICE.timeout`: the _Default of aot.ondevice.DeviceConfig's `timeout` field."""

    def __init__(self, where: str):
        self._where = where

    def __getattr__(self, field: str) -> _Default:
        if field.startswith("_"):
            raise AttributeError(field)
        return _Default(self._where, field)


DEVICE, SIMULATE = _Defaults("aot.ondevice:DeviceConfig"), _Defaults("aot.simulate:SimulateConfig")
RUN, BENCH = _Defaults("aot.generate:RunConfig"), _Defaults("aot.generate:BenchConfig")


@contextmanager
def _command(as_json: bool, debug: bool, torch: bool = True, interrupted: str = "nothing was written"):
    """Run a command body: AotError -> one line + its exit code; Ctrl-C -> 130, saying `interrupted`.
    `torch`: the command loads torch (its loggers are quieted after the import); publish and pull do
    not, and start in a fraction of a second."""
    if torch:
        quiet_libraries(debug)
    elif not debug:
        warnings.filterwarnings("ignore")
    try:
        yield
    except AotError as e:
        if debug:
            raise
        if as_json and not getattr(e, "result_printed", False):
            print(json.dumps({"ok": False, "error": {"kind": e.kind, "message": str(e), "exit_code": e.exit_code}}))
        err.print(f"[red]aot: error:[/red] {escape(str(e))}", soft_wrap=True)  # messages hold [brackets]
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        err.print(f"aot: interrupted; {interrupted}")
        raise typer.Exit(EXIT_INTERRUPTED)


def _version(value: bool) -> None:
    if value:
        out.print(f"aot {__version__}")
        raise typer.Exit()


def _given(**kw) -> dict:
    """Only the flags the user set: defaults live in the config dataclasses, nowhere else."""
    return {k: v for k, v in kw.items() if v is not None}


def _json(result: dict) -> None:
    print(json.dumps(result))
