"""Hostile manifests: the YAML that arrives in a pull request. Each is accepted or refused in one line
(exit 3) far inside 200 MB of allocations, and no message echoes an unbounded value. How long each
takes is bench/fuzz.py's to measure and report (a timed assertion here would flake under load)."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aot.errors import ConfigError
from aot.manifest import MAX_BYTES, load_manifest
from conftest import run_cli

HEAD = "version: 1\n"


def _bomb(levels: int, width: int = 9) -> str:
    """The billion laughs in YAML: each level an alias list of the level below."""
    lines = [HEAD, "x0: &a0 [lol]\n"]
    for i in range(1, levels + 1):
        lines.append(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]\n")
    lines.append(f"targets: [{{name: t, model: demo, quant: *a{levels}}}]\n")
    return "".join(lines)


HOSTILE = {
    "alias bomb (8 levels of 9)": (_bomb(8), "alias"),
    "one alias": (HEAD + "defaults: &d {quant: 8da4w}\ntargets: [{name: a, model: demo, validate: *d}]\n", "alias"),
    "merge key": (HEAD + "base: &b {model: demo}\ntargets: [{<<: *b, name: a}]\n", "alias"),
    "deep nesting": (HEAD + "targets: " + "[" * 5000 + "]" * 5000 + "\n", "nest"),
    "deep mappings": (HEAD + "targets: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "nest"),
    "over the size cap": (HEAD + "# " + "x" * MAX_BYTES + "\n", "MiB"),
    "a million values": (HEAD + "targets: [" + "1, " * 300_000 + "1]\n", "values"),
    "matrix explosion": (HEAD + "matrix: [{model: demo, " + ", ".join(f"k{i}: [{', '.join(map(str, range(10)))}]"
                                                                    for i in range(12)) + "}]\n", "combinations"),
    "many targets": (HEAD + "targets:\n" + "".join(f"  - {{name: t{i}, model: demo}}\n" for i in range(2000)), "at most"),
    "format spec bomb": (HEAD + "matrix: [{name: '{model:>999999999}', model: [demo]}]\n", "plain {key}"),
    "attribute lookup": (HEAD + "matrix: [{name: '{model.__class__.__mro__}', model: [demo]}]\n", "plain {key}"),
    "python tag": (HEAD + "targets: [!!python/object/apply:os.system ['echo owned']]\n", "not valid YAML"),
    "unhashable key": (HEAD + "targets: [{? [a, b] : c, name: x}]\n", "not valid YAML"),
    "a 900 KB string": (HEAD + "targets: [{name: a, model: '" + "m" * 900_000 + "'}]\n", "model"),
    "a 1000-character key": (HEAD + "targets: [{name: a, " + "k" * 1000 + ": 1}]\n", "unknown key"),
    "huge int": (HEAD + "targets: [{name: a, model: demo, max_context_len: " + "9" * 5000 + "}]\n", "cannot be read"),
    "binary blob": (HEAD + "targets: [{name: a, model: !!binary " + "QUFB" * 200_000 + "}]\n", "model"),
    "not UTF-8": (b"version: 1\ntargets: [{name: \xff\xfe}]\n", "YAML"),
    "NUL bytes": (HEAD + "targets: [{name: \"a\\0b\", model: demo}]\n", "control character"),
    "terminal escapes": (HEAD + "targets: [{name: \"\\e[2J\\e[31mowned\", model: demo}]\n", "control character"),
    "timestamp version": ("version: 2001-12-14t21:59:43.10-05:00\ntargets: [{name: a, model: demo}]\n", "version"),
    "10k problems": (HEAD + "targets: [{name: a, model: demo, " + ", ".join(f"bad{i}: 1" for i in range(10_000)) + "}]\n",
                     "more"),
    "empty": ("", "mapping"),
    "a list": ("- 1\n- 2\n", "mapping"),
    "tabs": (HEAD + "targets:\n\t- name: a\n", "not valid YAML"),
}


def _load_bounded(path):
    """Load `path`; (error message or None, seconds, peak MB of Python allocations)."""
    def load():
        try:
            load_manifest(path, path.parent / "out")
        except ConfigError as e:
            return str(e)

    start = time.perf_counter()
    message = load()
    seconds = time.perf_counter() - start
    tracemalloc.start()  # a second time, traced (tracing slows it 2-3x)
    load()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return message, seconds, peak


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_manifests_are_refused_cheaply_in_one_line(tmp_path, case):
    text, expect = HOSTILE[case]
    path = tmp_path / "release.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    message, seconds, peak = _load_bounded(path)
    assert message is not None, case
    assert expect in message, (case, message[:300])
    assert peak < 200, (case, seconds, peak)
    assert len(message) < 2100 and "\n" not in message, (case, len(message))
    result = run_cli("plan", "--manifest", path)
    assert result.exit_code == 3 and len(result.stderr.strip().splitlines()) == 1, (case, result.stderr[-300:])
    assert not (tmp_path / "out").exists()


def test_a_release_sized_manifest_is_inside_the_caps(tmp_path):
    """The caps are far from a real release: 160 targets (a 2x4x2x10 matrix) beside a 500 KB comment."""
    text = (HEAD + "defaults: {model: demo}\n# " + "c" * 500_000 + "\nmatrix:\n"
            "  - name: '{quant}-g{group_size}-e{embedding_quant}-s{seed}'\n"
            "    quant: [8da4w, 8da8w]\n    group_size: [32, 64, 128, 256]\n    embedding_quant: ['4', '8']\n"
            f"    seed: [{', '.join(map(str, range(10)))}]\n")
    path = tmp_path / "big.yaml"
    path.write_text(text)
    m = load_manifest(path, tmp_path / "out")
    assert len(m.targets) == 160 and m.targets[0].name == "8da4w-g32-e4-s0"


def test_the_shipped_manifests_read_as_safe_load_reads_them():
    """The C safe loader gives what yaml.safe_load gives, on every manifest in the repo."""
    import yaml
    from pathlib import Path

    from aot.manifest import _parse

    shipped = sorted(Path(__file__).resolve().parents[1].glob("**/*.yaml"))
    shipped = [p for p in shipped if ".venv" not in p.parts and "build" not in p.parts]
    assert shipped
    for p in shipped:
        assert _parse(p.read_bytes(), p) == yaml.safe_load(p.read_bytes()), p


YAML_TEXT = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(st.text(max_size=12), children, max_size=5)),
    max_leaves=30)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=YAML_TEXT, fields=st.dictionaries(
    st.sampled_from(["name", "model", "quant", "group_size", "max_context_len", "eos_ids", "out", "validate",
                     "adapters", "kv_cache", "attention_sink", "device_memory", "checkpoint", "seed"]),
    YAML_TEXT, max_size=5))
def test_random_manifests_get_an_answer_in_one_line(tmp_path, doc, fields):
    import yaml

    path = tmp_path / "fuzz.yaml"
    for body in ({"version": 1, "targets": [fields]}, {"version": 1, "matrix": [fields]}, doc):
        path.write_text(yaml.safe_dump(body))
        message, seconds, peak = _load_bounded(path)
        assert message is None or ("\n" not in message and len(message) < 2100)
        assert peak < 200
