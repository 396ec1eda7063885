"""Every option of every command, walked from the typer application itself (a new option is in here
the day it is added), fed its boundaries, values past them and hostile strings: the answer is one
line on stderr and exit 2 (a usage error) or another documented code, never a traceback.

The library calls the commands end in are replaced by a fake that exits 0 ("reached"): a value
the CLI let through reaches the library, and these tests are about what reaches it, not about
building or serving (which other tests do for real)."""

from __future__ import annotations

import math

import pytest
import typer
import typer.main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.core import TyperArgument

from aot.cli import app
from aot.errors import EXIT_CODES
from conftest import run_cli

# What each command body ends in; the fake stands in for these.
LIBRARY = ["aot.pipeline:build", "aot.release:build_targets", "aot.release:release", "aot.release:plan",
           "aot.inspect:inspect_bundle", "aot.dist.publish:publish", "aot.dist.pull:pull", "aot.generate:generate",
           "aot.generate:Chat", "aot.simulate:simulate", "aot.gates:validate_bundle", "aot.benchmark:bench_bundle",
           "aot.serve:serve", "aot.doctor:diagnose", "aot.farm:package", "aot.farm:collect"]


def _walk(group, path=()):
    for name, cmd in sorted(group.commands.items()):
        if getattr(cmd, "commands", None):
            yield from _walk(cmd, (*path, name))
        else:
            yield (*path, name), cmd


COMMANDS = list(_walk(typer.main.get_command(app)))
OPTIONS = [(path, p) for path, cmd in COMMANDS for p in cmd.params
           if not isinstance(p, TyperArgument) and not p.is_flag and p.name not in ("help",)]
NUMBERS = ("int", "float")


def _kind(p) -> str:
    """The option's value type as typer names it: int, float, str, Path (a list's: its items')."""
    kind = p.bare_type()
    return kind[5:-1] if kind.startswith("list[") else kind


IDS = [f"{' '.join(path)} {p.opts[-1]}" for path, p in OPTIONS]


@pytest.fixture
def reached(monkeypatch):
    import importlib

    def fake(*args, **kwargs):
        raise typer.Exit(0)

    for where in LIBRARY:
        module, _, name = where.partition(":")
        monkeypatch.setattr(importlib.import_module(module), name, fake)


def _base(path) -> list[str]:
    """The command with a (missing) path for each of its arguments and required options."""
    cmd = dict(COMMANDS)[path]
    required = [a for p in cmd.params if p.required and not isinstance(p, TyperArgument) for a in (p.opts[-1], "/nonexistent/aot-fuzz")]
    return [*path, *["/nonexistent/aot-fuzz" for p in cmd.params if isinstance(p, TyperArgument)], *required]


def _answer(args, *, accepted: bool | None):
    """Run `aot ARGS`; check the answer's form. accepted: True (must reach the library or give a
    documented error), False (must be refused at parse time: exit 2), None (any documented code)."""
    result = run_cli(*args)
    shown = " ".join(repr(a)[:60] for a in args)
    assert "Traceback" not in result.stdout + result.stderr, shown
    assert result.exit_code in EXIT_CODES, (shown, result.exit_code, result.stderr[-300:])
    if result.exit_code != 0:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("aot: "), (shown, result.stderr[-500:])
        assert len(lines[0]) < 1200, shown  # never an unbounded value echoed back
    if accepted is False:
        assert result.exit_code == 2, (shown, result.exit_code, result.stderr)
    return result


def test_every_numeric_option_declares_its_range():
    """So a number the command cannot use (a negative token count, a port past 65535, a 10^30
    seed) stops at parsing, in one line, instead of deep inside a run."""
    missing = [i for i, (_, p) in zip(IDS, OPTIONS) if _kind(p) in NUMBERS and (p.min is None or p.max is None)]
    assert not missing, missing
    assert len(COMMANDS) >= 14 and len(OPTIONS) >= 100  # the walk sees the whole application


def _bad_numbers(p) -> list[str]:
    step = 1 if _kind(p) == "int" else max(abs(p.max - p.min) * 1e-3, 1e-6)
    return [str(p.min - step), str(p.max + step), "nan", "inf", "-inf", "", "abc", "1e999", "--", "１"]


@pytest.mark.parametrize("path,option", [o for o in OPTIONS if _kind(o[1]) in NUMBERS],
                         ids=[i for i, o in zip(IDS, OPTIONS) if _kind(o[1]) in NUMBERS])
def test_numbers_past_their_range_are_usage_errors(path, option, reached):
    flag = option.opts[-1]
    for value in _bad_numbers(option):
        _answer([*_base(path), flag, value], accepted=False)
    for value in (option.min, option.max):  # the boundaries themselves are accepted
        text = str(int(value)) if _kind(option) == "int" else repr(float(value))
        result = _answer([*_base(path), flag, text], accepted=None)
        assert result.exit_code != 2, (path, flag, text, result.stderr)


def _numbers(p):
    if _kind(p) == "int":
        outside = st.one_of(st.integers(max_value=p.min - 1), st.integers(min_value=p.max + 1))
        inside = st.integers(p.min, p.max)
    else:
        outside = st.one_of(st.floats(max_value=p.min, exclude_max=True, allow_nan=False),
                            st.floats(min_value=p.max, exclude_min=True, allow_nan=False))
        inside = st.floats(p.min, p.max)
    return st.one_of(outside.map(lambda v: (str(v), False)), inside.map(lambda v: (str(v), True)))


HOSTILE = st.one_of(
    st.sampled_from(["", " ", "-", "--", "--json", "-x", "x" * 5000, "\n\n", "é✓", "\udcff\udcfe", "../" * 50,
                     "/dev/null", "/", "/proc/self/mem", "NaN", "0", "-1", "9" * 400, "a=b=c", "=", "NAME=",
                     "1,2,3", "%s%n", "{}", "[]", "${HOME}", "~", "C:\\x"]),
    st.text(max_size=40),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(OPTIONS), data=st.data())
def test_any_value_of_any_option_gets_one_line_and_a_documented_code(case, data, reached):
    """Random options with random values (numbers in and out of range, hostile strings, paths
    that are devices or directories): one line, a documented exit code, no traceback."""
    path, option = case
    if _kind(option) in NUMBERS:
        value, inside = data.draw(_numbers(option))
        _answer([*_base(path), option.opts[-1], value], accepted=None if inside else False)
    else:
        _answer([*_base(path), option.opts[-1], data.draw(HOSTILE)], accepted=None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from([p for p, _ in COMMANDS]), args=st.lists(HOSTILE, max_size=4))
def test_hostile_arguments_and_unknown_options(path, args, reached):
    _answer([*path, *args], accepted=None)


def test_the_cases_the_issue_names(reached):
    for args in (["run", "b", "--prompt", "hi", "--temperature", "-1"], ["run", "b", "--max-new-tokens", "0"],
                 ["run", "b", "--max-new-tokens", "-5"], ["serve", "b", "--port", "70000"],
                 ["build", "--max-context-len", "0"], ["validate", "b", "--min-top1", "1.5"]):
        r = _answer(args, accepted=False)
        assert args[-2] in r.stderr and "--help" in r.stderr
    assert math.isclose(dict(OPTIONS_BY_FLAG)["run --temperature"].min, 0.0)


OPTIONS_BY_FLAG = [(f"{' '.join(path)} {p.opts[-1]}", p) for path, p in OPTIONS]
