"""Fuzzed readers (tests/fuzz_targets.py): bundle.json, the .pte header, manifests and the release
index, each fed hypothesis' bytes and structures and mutations of a valid sample. A bounded run
here; bench/fuzz.py runs the same targets for longer and reports cases and findings."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as F

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
                    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=10), c, max_size=4)),
                    max_leaves=25)


@pytest.fixture(scope="module")
def pte() -> bytes:
    return F.tiny_pte()


def _mutate(sample: bytes, edits) -> bytes:
    raw = bytearray(sample)
    for at, value, kind in edits:
        at %= max(len(raw), 1)
        if kind == 0 and raw:
            raw[at] = value
        elif kind == 1:
            raw.insert(at, value)
        elif kind == 2 and raw:
            del raw[at]
        else:
            raw = raw[:at]
    return bytes(raw)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255), st.integers(0, 3)), min_size=1, max_size=6)


def _set_path(doc, path, value):
    """`doc` with the value at a path of keys/indices replaced (structure-aware mutation)."""
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def test_the_samples_are_accepted(pte, tmp_path):
    assert F.release_index(F.sample_index()) == "ok"
    assert F.manifest(F.SAMPLE_MANIFEST, tmp_path / "m") == "ok"
    assert F.pte_header(pte, tmp_path / "p") == "ok"
    assert F.bundle_json(F.sample_bundle_json(pte), tmp_path / "b", pte) == "ok"


@FAST
@given(data=st.data())
def test_bundle_json_fields_replaced_by_anything(pte, tmp_path_factory, data):
    doc = json.loads(F.sample_bundle_json(pte))
    path = data.draw(st.sampled_from([p for p in _paths(doc) if p]))
    doc = _set_path(doc, path, data.draw(JSON))
    F.bundle_json(json.dumps(doc).encode(), tmp_path_factory.mktemp("b"), pte)


@FAST
@given(edits=EDITS)
def test_bundle_json_bytes_mutated(pte, tmp_path_factory, edits):
    F.bundle_json(_mutate(F.sample_bundle_json(pte), edits), tmp_path_factory.mktemp("b"), pte)


@FAST
@given(edits=EDITS)
def test_pte_bytes_mutated(pte, tmp_path_factory, edits):
    F.pte_header(_mutate(pte, edits), tmp_path_factory.mktemp("p"))


@FAST
@given(raw=st.binary(max_size=300))
def test_pte_random_bytes(tmp_path_factory, raw):
    F.pte_header(raw, tmp_path_factory.mktemp("p"))


@FAST
@given(data=st.data())
def test_index_fields_replaced_by_anything(data):
    doc = json.loads(F.sample_index())
    path = data.draw(st.sampled_from([p for p in _paths(doc) if p]))
    F.release_index(json.dumps(_set_path(doc, path, data.draw(JSON))).encode())


@FAST
@given(edits=EDITS)
def test_index_bytes_mutated(edits):
    F.release_index(_mutate(F.sample_index(), edits))


@FAST
@given(edits=EDITS)
def test_manifest_bytes_mutated(tmp_path_factory, edits):
    F.manifest(_mutate(F.SAMPLE_MANIFEST, edits), tmp_path_factory.mktemp("m"))


@FAST
@given(raw=st.binary(max_size=400))
def test_manifest_random_bytes(tmp_path_factory, raw):
    F.manifest(raw, tmp_path_factory.mktemp("m"))
