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
import os
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import yaml

from aot.adapters import parse_spec
from aot.config import FIELDS, PATH_FIELDS, BuildConfig, FieldType, build_config, field_types
from aot.errors import ConfigError
from aot.metrics import Gates
from aot.quant import QuantConfig
from aot.validate import ValidateConfig

FORMAT_VERSION = 1
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
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"--manifest {path}: cannot read it ({e.strerror})") from None
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}: not valid YAML{line} ({getattr(e, 'problem', e)})") from None
    root = Path(root).expanduser() if root else Path("build") / path.stem
    problems: list[str] = []
    targets = _targets(doc, path, root.absolute(), problems)
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    return Manifest(path, hashlib.sha256(raw).hexdigest(), root.absolute(), tuple(targets))


def _targets(doc, path: Path, root: Path, problems: list[str]) -> list[Target]:
    if not isinstance(doc, dict):
        problems.append(f"the document must be a mapping with {', '.join(TOP_KEYS)}")
        return []
    for key in doc:
        if key not in TOP_KEYS:
            problems.append(f"unknown top-level key '{key}'; allowed: {', '.join(TOP_KEYS)}")
    if doc.get("version") != FORMAT_VERSION:
        problems.append(f"'version' must be {FORMAT_VERSION}, but got {doc.get('version')!r}")
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
            problems.append(f"target '{name}': duplicate name")
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
        entries.append((f"target '{entry.get('name', f'#{i}')}'", entry))
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
        for values in itertools.product(*axes.values()):
            point = dict(zip(axes, values))
            names = {**scalars, **point}
            entry = {k: v for k, v in spec.items() if k not in axes and k != "name"}
            try:
                entry = {k: v.format(**names) if isinstance(v, str) else v for k, v in entry.items()}
                entry["name"] = str(spec.get("name", DEFAULT_NAME)).format(**names)
            except (KeyError, IndexError, ValueError) as e:
                problems.append(f"matrix[{i}]: a template refers to {e}, which is neither an axis nor a field")
                break
            entries.append((f"matrix[{i}] {point}", {**entry, **point}))
    return entries


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
            problems.append(f"{label}: unknown key '{key}'")


def _check_types(label: str, mapping: dict, types: dict[str, FieldType], problems: list[str]) -> bool:
    ok = True
    for key, value in mapping.items():
        want = types.get(key)
        if want is not None and not want.accepts(value):
            problems.append(f"{label}: key '{key}' must be {want.describe()}, but got {value!r}")
            ok = False
    return ok


def _target(name: str, fields_: dict, path: Path, root: Path, problems: list[str]) -> Target | None:
    label = f"target '{name}'"
    _check_keys(label, fields_, TARGET_KEYS, problems)
    build_fields = {k: v for k, v in fields_.items() if k in FIELDS}
    ok = _check_types(label, build_fields, {k: f.type for k, f in FIELDS.items()}, problems)
    out = fields_.get("out", name)
    if not isinstance(out, str) or not out:
        problems.append(f"{label}: key 'out' must be a non-empty relative path")
        return None
    rel = PurePosixPath(out)
    if rel.is_absolute() or ".." in rel.parts or os.path.isabs(out):
        problems.append(f"{label}: key 'out' ({out}) escapes the output root; use a path inside it")
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
        problems.append(f"{label}: {e}")
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
        problems.append(f"{label} validate: {e}")
        return None


def _beside(manifest: Path, value: str) -> Path:
    p = Path(os.path.expandvars(value)).expanduser()
    return p if p.is_absolute() else (manifest.parent / p).absolute()
