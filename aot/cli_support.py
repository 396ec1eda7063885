"""What every `aot` command shares: the consoles, the --json/--debug options, the error
boundary (one line and an exit code), and flag defaults read from the config dataclasses."""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from contextlib import contextmanager

import typer
from rich.console import Console
from typer import _click
from typer.core import TyperGroup
from typer.exceptions import Abort
from rich.markup import escape

from aot import __version__
from aot.errors import EXIT_INTERRUPTED, AotError, short
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
        message = short(" ".join(str(e).splitlines()), 1000)  # one line, and no unbounded value echoed back
        if as_json and not getattr(e, "result_printed", False):
            print(json.dumps({"ok": False, "error": {"kind": e.kind, "message": message, "exit_code": e.exit_code}}))
        err.print(f"[red]aot: error:[/red] {escape(message)}", soft_wrap=True)  # messages hold [brackets]
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        err.print(f"aot: interrupted; {interrupted}")
        raise typer.Exit(EXIT_INTERRUPTED)


class OneLineGroup(TyperGroup):
    """The application's group: a usage error (an unknown option, a bad value, a missing argument)
    is one line on stderr and exit 2, as every other error is one line, instead of typer's boxed
    usage text. `aot` alone still prints the help (exit 2), `--help` too (exit 0)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except _click.exceptions.ClickException as e:
            sys.exit(_usage_line(e))
        except Abort:
            err.print("aot: interrupted; nothing was written")
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)


def _usage_line(e) -> int:
    """Print a click error as one line (`aot: error: aot run: --max-new-tokens: ...`); its exit code."""
    message = " ".join(e.format_message().split())
    where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "aot"
    hint = f" (see {where} --help)" if isinstance(e, _click.exceptions.UsageError) else ""
    err.print(f"[red]aot: error:[/red] {escape(where)}: {escape(short(message, 400))}{escape(hint)}", soft_wrap=True)
    return e.exit_code


def _version(value: bool) -> None:
    if value:
        out.print(f"aot {__version__}")
        raise typer.Exit()


def _given(**kw) -> dict:
    """Only the flags the user set: defaults live in the config dataclasses, nowhere else."""
    return {k: v for k, v in kw.items() if v is not None}


def _json(result: dict) -> None:
    print(json.dumps(result))
