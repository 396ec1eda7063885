"""Release manifests: YAML under version control that names every target of a release.

    version: 1
    defaults: {delegate: xnnpack, quant: 8da4w}
    targets:
      - name: demo-8da4w
        model: demo
        validate: {max_ppl_ratio: 1.05, min_top1: 0.85}
    matrix:
      - name: "{model}-{quant}-g{group_size}"    # generated names; axes are the keys with list values
        model: 1b
        checkpoint: ~/models/Llama-3.2-1B-Instruct
        quant: [8da4w, 8da8w]
        group_size: [32, 128]

Loaded only with yaml.safe_load into the same config objects `aot build` flags make
(aot.config.build_config), so defaults live in one place. Every problem (unknown keys, wrong types,
duplicate names, outputs escaping the output root, invalid values) is collected, each with its
target and key, and reported together before anything is built.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import string
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import yaml

from aot.adapters import parse_spec
from aot.config import FIELDS, PATH_FIELDS, BuildConfig, FieldType, build_config, field_types
from aot.errors import ConfigError, short
from aot.metrics import Gates
from aot.quant import QuantConfig
from aot.validate import ValidateConfig

FORMAT_VERSION = 1
# What a manifest may cost to read: its size, its YAML nesting and values, and the targets it
# names (a matrix's product included). A release's manifest is far inside all four.
MAX_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_NODES = 20_000
MAX_TARGETS = 256
MAX_PROBLEMS = 20  # reported; the count says how many more
TOP_KEYS = ("version", "defaults", "targets", "matrix")
TARGET_KEYS = ("name", "out", "validate", *FIELDS)
DEFAULT_NAME = "{model}-{delegate}-{quant}"
# validate: the options of `aot validate` (ValidateConfig) and its thresholds (Gates), typed by
# the same schema as the build fields (aot.config.field_types).
_GATE_KEYS = tuple(f.name for f in fields(Gates))
VALIDATE_FIELDS: dict[str, FieldType] = {**field_types(ValidateConfig, skip=("gates",)), **field_types(Gates)}


@dataclass(frozen=True)
class Target:
    name: str
    out: str  # bundle directory, relative to the output root
    build: BuildConfig
    validate: ValidateConfig | None
    fields: dict  # the merged manifest fields, as written (for `aot plan`)


@dataclass(frozen=True)
class Manifest:
    path: Path
    sha256: str
    root: Path
    targets: tuple[Target, ...]

    def select(self, names: list[str] | None) -> list[Target]:
        if not names:
            return list(self.targets)
        known = {t.name: t for t in self.targets}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"--target {', '.join(unknown)}: not in {self.path}; its targets: {', '.join(known)}"
            )
        return [known[n] for n in dict.fromkeys(names)]


def load_manifest(path: Path, root: Path | None = None) -> Manifest:
    path = Path(path).expanduser()
    raw = _read(path)
    doc = _parse(raw, path)
    root = Path(root).expanduser() if root else Path("build") / path.stem
    problems: list[str] = []
    targets = _targets(doc, path, root.absolute(), problems)
    if problems:
        more = f"; and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        raise ConfigError(short(f"{short(path)}: {len(problems)} problem(s): " + "; ".join(problems[:MAX_PROBLEMS]), 1800)
                          + more)
    return Manifest(path, hashlib.sha256(raw).hexdigest(), root.absolute(), tuple(targets))


def _read(path: Path) -> bytes:
    """The manifest's bytes, at most MAX_BYTES of them (a manifest is a page of YAML, not a dump)."""
    try:
        with open(path, "rb") as f:
            if not os.path.isfile(path):
                raise ConfigError(f"--manifest {short(path)}: not a regular file; give the path of a YAML file")
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"--manifest {short(path)}: cannot read it ({e.strerror})") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"--manifest {short(path)}: larger than {MAX_BYTES >> 20} MiB; a release manifest is "
                          "a page of YAML (use matrix: for many targets)")
    return raw


def _parse(raw: bytes, path: Path):
    """yaml's safe loader, after a pass over the parser's events that refuses what makes a small file
    expensive: aliases (a 20-line file of nested aliases expands to gigabytes), nesting past
    MAX_DEPTH (the composer recurses) and more than MAX_NODES values. libyaml's parser (CSafeLoader:
    SafeLoader's constructors, C scanning) where PyYAML has it: the pure-Python one takes ~14 s on a
    1 MB file here."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth = nodes = 0
    try:
        for event in yaml.parse(raw, Loader=loader):
            line = f"line {event.start_mark.line + 1}" if event.start_mark else "a line"
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"{short(path)}: {line}: a YAML alias (*{short(event.anchor, 40)}); aot manifests "
                                  "do not expand aliases: write the value out, or put shared fields in defaults:")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(f"{short(path)}: {line}: nested more than {MAX_DEPTH} levels deep; a manifest "
                                      "is targets of flat fields")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > MAX_NODES:
                    raise ConfigError(f"{short(path)}: more than {MAX_NODES} YAML values; split the release into "
                                      "manifests, or use matrix: for many targets")
        doc = yaml.load(raw, Loader=loader)  # noqa: S506 - the safe loader (safe_load's), in C where available
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        problem = " ".join(str(getattr(e, "problem", e)).split())
        raise ConfigError(f"{short(path)}: not valid YAML{line} ({short(problem, 200)})") from None
    except (ValueError, OverflowError) as e:  # an int of 5,000 digits (Python's int-from-str limit)
        raise ConfigError(f"{short(path)}: a value cannot be read ({short(' '.join(str(e).split()), 120)})") from None
    except RecursionError:
        raise ConfigError(f"{short(path)}: nested too deeply to read") from None
    bad = _control_character(doc)
    if bad is not None:
        raise ConfigError(f"{short(path)}: {short(repr(bad), 80)} holds a control character (NUL, ESC, ...); "
                          "names, paths and values are printable text")
    return doc


def _control_character(value):
    """The first string (key or value) in `value` that holds a C0/C1 control character other than
    tab and newline: NUL breaks every path it reaches, ESC rewrites the terminal that prints it."""
    if isinstance(value, str):
        return value if any((ord(c) < 32 and c not in "\t\n") or 127 <= ord(c) < 160 for c in value) else None
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        found = _control_character(item)
        if found is not None:
            return found
    return None


def _targets(doc, path: Path, root: Path, problems: list[str]) -> list[Target]:
    if not isinstance(doc, dict):
        problems.append(f"the document must be a mapping with {', '.join(TOP_KEYS)}")
        return []
    for key in doc:
        if key not in TOP_KEYS:
            problems.append(f"unknown top-level key '{short(key, 60)}'; allowed: {', '.join(TOP_KEYS)}")
    if doc.get("version") != FORMAT_VERSION:
        problems.append(f"'version' must be {FORMAT_VERSION}, but got {short(repr(doc.get('version')), 60)}")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append("'defaults' must be a mapping")
        defaults = {}
    _check_keys("defaults", defaults, [k for k in TARGET_KEYS if k not in ("name", "out")], problems)
    entries = _entries(doc, defaults, problems)
    if not entries:
        problems.append("no targets: add 'targets' or 'matrix'")
    seen: dict[str, None] = {}
    out = []
    for label, entry in entries:
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{label}: 'name' is required (a non-empty string)")
            continue
        if name in seen:
            problems.append(f"target '{short(name, 80)}': duplicate name")
            continue
        seen[name] = None
        target = _target(name, {**defaults, **entry}, path, root, problems)
        if target is not None:
            out.append(target)
    return out


def _entries(doc: dict, defaults: dict, problems: list[str]) -> list[tuple[str, dict]]:
    """(label for messages, fields) for every listed and every matrix-generated target.

    A matrix entry's axes are its keys with list values; every combination is a target. String
    values (the name template included) may use {key} for any axis or scalar field of the target.
    """
    entries = []
    for i, entry in enumerate(_list(doc, "targets", problems)):
        if not isinstance(entry, dict):
            problems.append(f"targets[{i}]: must be a mapping")
            continue
        entries.append((f"target '{short(entry.get('name', f'#{i}'), 80)}'", entry))
    for i, spec in enumerate(_list(doc, "matrix", problems)):
        if not isinstance(spec, dict):
            problems.append(f"matrix[{i}]: must be a mapping")
            continue
        axes = {k: v for k, v in spec.items() if isinstance(v, list) and k != "eos_ids"}
        if not axes:
            problems.append(f"matrix[{i}]: no axis (a key with a list of values)")
            continue
        scalars = {k: v for k, v in {**_NAME_DEFAULTS, **defaults, **spec}.items()
                   if k not in axes and isinstance(v, (str, int, float))}
        count = math.prod(len(v) for v in axes.values())
        if len(entries) + count > MAX_TARGETS:
            problems.append(f"matrix[{i}]: {count} combinations; a manifest names at most {MAX_TARGETS} targets")
            continue
        for values in itertools.product(*axes.values()):
            point = dict(zip(axes, values))
            names = {**scalars, **point}
            entry = {k: v for k, v in spec.items() if k not in axes and k != "name"}
            try:
                entry = {k: _fill(v, names) if isinstance(v, str) else v for k, v in entry.items()}
                entry["name"] = _fill(str(spec.get("name", DEFAULT_NAME)), names)
            except (KeyError, IndexError, ValueError) as e:
                problems.append(f"matrix[{i}]: {short(e, 120)}")
                break
            entries.append((f"matrix[{i}] {short(point, 120)}", {**entry, **point}))
    if len(entries) > MAX_TARGETS:
        problems.append(f"{len(entries)} targets; a manifest names at most {MAX_TARGETS}")
        return []
    return entries


def _fill(template: str, names: dict) -> str:
    """`template` with each {key} replaced by that field's value. Only plain names: no format specs
    or conversions ({model:>99999999} would allocate 100 MB) and no attribute or index lookups."""
    out = []
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {short(repr(template), 60)}: {e}") from None
    for text, field, spec, conversion in parts:
        out.append(text)
        if field is None:
            continue
        if spec or conversion or not field.isidentifier():
            raise ValueError(f"template {short(repr(template), 60)}: {{{short(field, 40)}}} must be a plain "
                             "{key}, without a format or lookup")
        if field not in names:
            raise ValueError(f"a template refers to '{short(field, 40)}', which is neither an axis nor a field")
        out.append(str(names[field]))
    return "".join(out)


_NAME_DEFAULTS = {"delegate": BuildConfig.delegate, "quant": QuantConfig.scheme}  # so names can use them


def _list(doc: dict, key: str, problems: list[str]) -> list:
    value = doc.get(key) or []
    if not isinstance(value, list):
        problems.append(f"'{key}' must be a list")
        return []
    return value


def _check_keys(label: str, mapping: dict, allowed, problems: list[str]) -> None:
    for key in mapping:
        if key not in allowed:
            problems.append(f"{label}: unknown key '{short(key, 60)}'")


def _check_types(label: str, mapping: dict, types: dict[str, FieldType], problems: list[str]) -> bool:
    ok = True
    for key, value in mapping.items():
        want = types.get(key)
        if want is not None and not want.accepts(value):
            problems.append(f"{label}: key '{key}' must be {want.describe()}, but got {short(repr(value), 80)}")
            ok = False
    return ok


def _target(name: str, fields_: dict, path: Path, root: Path, problems: list[str]) -> Target | None:
    label = f"target '{short(name, 80)}'"
    _check_keys(label, fields_, TARGET_KEYS, problems)
    build_fields = {k: v for k, v in fields_.items() if k in FIELDS}
    ok = _check_types(label, build_fields, {k: f.type for k, f in FIELDS.items()}, problems)
    out = fields_.get("out", name)
    if not isinstance(out, str) or not out:
        problems.append(f"{label}: key 'out' must be a non-empty relative path")
        return None
    rel = PurePosixPath(out)
    if rel.is_absolute() or ".." in rel.parts or os.path.isabs(out):
        problems.append(f"{label}: key 'out' ({short(out, 80)}) escapes the output root; use a path inside it")
        return None
    validate = _validate_config(label, fields_.get("validate"), path, problems)
    if not ok:
        return None
    for key in PATH_FIELDS:  # relative paths are relative to the manifest
        if key in build_fields:
            build_fields[key] = str(_beside(path, build_fields[key]))
    if build_fields.get("adapters"):  # NAME=DIR or DIR: the folders too
        build_fields["adapters"] = [(f"{n}=" if n else "") + str(_beside(path, d))
                                    for n, d in (parse_spec(str(a)) for a in build_fields["adapters"])]
    try:
        cfg = build_config(root / rel, force=True, **build_fields)
    except ConfigError as e:
        problems.append(f"{label}: {short(e, 300)}")
        return None
    return Target(name, rel.as_posix(), cfg, validate, dict(fields_))


def _validate_config(label: str, value, path: Path, problems: list[str]) -> ValidateConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(f"{label}: key 'validate' must be a mapping of gates")
        return None
    _check_keys(f"{label} validate", value, VALIDATE_FIELDS, problems)
    known = {k: v for k, v in value.items() if k in VALIDATE_FIELDS}
    if not _check_types(f"{label} validate", known, VALIDATE_FIELDS, problems):
        return None
    gates = Gates(**{k: float(v) for k, v in known.items() if k in _GATE_KEYS})
    options = {k: v for k, v in known.items() if k not in _GATE_KEYS}
    for key in (k for k, t in VALIDATE_FIELDS.items() if t.base is Path):  # reference, text
        if key in options:
            options[key] = _beside(path, options[key])
    try:
        return ValidateConfig(gates=gates, **options)
    except ConfigError as e:
        problems.append(f"{label} validate: {short(e, 300)}")
        return None


def _beside(manifest: Path, value: str) -> Path:
    p = Path(os.path.expandvars(value)).expanduser()
    return p if p.is_absolute() else (manifest.parent / p).absolute()
