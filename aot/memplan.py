"""The runtime memory plan of a serialized ExecuTorch program: what a phone must hold to run it,
read from the model.pte bytes alone (bundle.json's `memory_plan`, `aot inspect`).

Per method, from its ExecutionPlan:
- planned arenas (`non_const_buffer_sizes[1:]`): malloc'd when the method loads, whatever the
  prompt; ExecuTorch's Module and the Python runtime zero-fill them, so they are resident at once.
  Within them, the mutable buffers (the KV cache: the tensors the emitter names, which aot's builds
  ask for with `emit_mutable_buffer_names`) and the activations (the rest).
- constants: tensors in the program's constant segment, mmapped from the .pte (file-backed pages,
  resident as they are read).
- delegate blobs: each delegate's processed payload plus the named data it references (XNNPACK:
  its weights). What the delegate makes of them at init is the delegate's own (DELEGATE_INIT).

Only the flatbuffer head of the file is parsed (tens of KiB even for a 3B program); segments are
measured from the segment table, so a 3 GiB .pte costs no more to read than a tiny one.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path

from aot.errors import BundleError

MIB, GIB = 2**20, 2**30

# ScalarType (executorch/exir/scalar_type.py) -> (name, bytes per element)
_DTYPES = {
    0: ("uint8", 1), 1: ("int8", 1), 2: ("int16", 2), 3: ("int32", 4), 4: ("int64", 8), 5: ("float16", 2),
    6: ("float32", 4), 7: ("float64", 8), 11: ("bool", 1), 12: ("qint8", 1), 13: ("quint8", 1), 14: ("qint32", 4),
    15: ("bfloat16", 2), 22: ("bits16", 2), 23: ("float8_e5m2", 1), 24: ("float8_e4m3fn", 1), 27: ("uint16", 2),
    28: ("uint32", 4), 29: ("uint64", 8),
}

# What a delegate adds when it initializes, by backend id: (at init, left unknown).
DELEGATE_INIT = {
    "XnnpackBackend": ("packs its weights into memory of its own (about its named-data bytes, anonymous, held "
                       "while the method is loaded) and releases the .pte's mapped copy",
                       "each subgraph's activation workspace (XNNPACK's own, not in ExecuTorch's plan)"),
}
_UNKNOWN_INIT = (None, "what it allocates at init (not known from the program)")

# The parts of a plan, by key, as `aot inspect` names them.
PARTS = {
    "mutable_buffers_bytes": "KV cache (mutable buffers)",
    "activations_bytes": "activations",
    "delegate_bytes": "delegate weights",
    "constants_bytes": "constants (mmapped)",
    "external_bytes": "external weights (model.ptd)",
}


def read_memory_plan(path: Path, data_path: Path | None = None) -> dict:
    """The plan of the .pte at `path` (mapped, not read whole). With `data_path` (the bundle's
    model.ptd), its weights count at load too: the file's size, its header a few KiB of it (the
    delegate packs its part, as it does named data in the .pte; the rest is mmapped)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            plan = memory_plan(data)
    except Exception as e:  # unreadable, empty, or not a flatbuffer ExecuTorch can parse
        raise BundleError(f"{path}: cannot read the program's memory plan ({type(e).__name__}: {e}); "
                          "rebuild the bundle") from None
    if data_path is not None:
        total = plan["total"]
        total["external_bytes"] = Path(data_path).stat().st_size
        total["at_load_bytes"] += total["external_bytes"]
        total["biggest"] = biggest(total)
        plan["source"] = f"{plan['source']} + {Path(data_path).name}"
    return plan


def memory_plan(data) -> dict:
    """The plan of a serialized program. `data`: the .pte's bytes (bytes, memoryview or mmap)."""
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
    from executorch.exir._serialize._program import _get_extended_header

    header = _get_extended_header(data[:64])
    valid = header is not None and header.is_valid()
    program = _flatbuffer_to_program(bytes(data[: header.program_size] if valid else data[:]))
    base = header.segment_base_offset if valid else 0

    def segment(index: int) -> bytes:
        s = program.segments[index]
        return data[base + s.offset: base + s.offset + s.size]

    named = {n.key: program.segments[n.segment_index].size for n in program.named_data or []}
    read = {plan.name: _read_method(plan, program, segment, named) for plan in program.execution_plan}
    # Names are emitted for every mutable buffer or for none: a program without any cannot be split.
    split = any(r.arenas[i]["mutable"] for r in read.values() for i in r.arenas)
    methods = {name: r.record(split) for name, r in read.items()}
    return {
        "source": "model.pte",
        "mutable_buffers_named": split,
        "methods": methods,
        "program": {
            "constant_segment_bytes": _constant_segment_bytes(program),
            "named_data_bytes": sum(named.values()),
            "delegate_payload_bytes": sum(e["payload_bytes"] for m in methods.values() for e in m["delegates"].values()),
        },
        "total": _total(read, named, split),
        "unknown": sorted({f"{d}: {DELEGATE_INIT.get(d, _UNKNOWN_INIT)[1]}" for m in methods.values()
                           for d in m["delegates"]}),
    }


class _Method:
    """One ExecutionPlan's planned tensors by arena, constants and delegates."""

    def __init__(self, arenas: list[int]):
        # arena id -> its size, the named mutable buffers in it and how many other tensors it holds
        self.arenas = {i: {"bytes": n, "mutable": {}, "other": 0} for i, n in enumerate(arenas, start=1)}
        self.constants: dict[int, int] = {}  # constant buffer index -> bytes
        self.buffers: dict[str, object] = {}  # mutable buffer name -> its schema Tensor
        self.delegates: dict[str, dict] = {}
        self.named_data: set[str] = set()  # named-data keys its delegates reference

    def record(self, split: bool) -> dict:
        planned = sum(a["bytes"] for a in self.arenas.values())
        mutable = sum(sum(a["mutable"].values()) for a in self.arenas.values())
        # an arena this method plans nothing into: sized for the others' (their shared state)
        unused = sum(a["bytes"] for a in self.arenas.values() if not a["mutable"] and not a["other"])
        return {
            "planned_bytes": planned,
            "arenas": [a["bytes"] for a in self.arenas.values()],
            # None: the program names no mutable buffer (built without emit_mutable_buffer_names),
            # so its arenas cannot be split into cache and activations.
            "mutable_buffers_bytes": mutable if split else None,
            "activations_bytes": planned - mutable - unused if split else None,
            "unused_arena_bytes": unused,
            "mutable_buffers": _group(self.buffers),
            "constants_bytes": sum(self.constants.values()),
            "delegate_bytes": sum(e["payload_bytes"] + e["named_data_bytes"] for e in self.delegates.values()),
            "delegates": self.delegates,
        }


def _read_method(plan, program, segment, named: dict) -> _Method:
    m = _Method(list(plan.non_const_buffer_sizes[1:]))  # [0] is the constant buffer's, by convention
    for value in plan.values:
        t = value.val
        if type(t).__name__ != "Tensor":
            continue
        info = t.extra_tensor_info
        if info is not None and int(info.location) == 1:  # EXTERNAL: a .ptd file's, not this program's
            continue
        if t.allocation_info is not None:
            arena = m.arenas.setdefault(t.allocation_info.memory_id, {"bytes": 0, "mutable": {}, "other": 0})
            if info is not None and info.fully_qualified_name:
                arena["mutable"][info.fully_qualified_name] = _nbytes(t)
                m.buffers[info.fully_qualified_name] = t
            else:
                arena["other"] += 1
        elif t.data_buffer_idx > 0:
            m.constants[t.data_buffer_idx] = max(m.constants.get(t.data_buffer_idx, 0), _nbytes(t))
    for d in plan.delegates:
        if int(d.processed.location) == 1:  # SEGMENT
            payload = segment(d.processed.index)
        else:
            payload = program.backend_delegate_data[d.processed.index].data
        keys = {k for k in named if k.encode() in payload}
        entry = m.delegates.setdefault(d.id, {"subgraphs": 0, "payload_bytes": 0, "named_data_bytes": 0,
                                              "at_init": DELEGATE_INIT.get(d.id, _UNKNOWN_INIT)[0]})
        entry["subgraphs"] += 1
        entry["payload_bytes"] += len(payload)
        entry["named_data_bytes"] += sum(named[k] for k in keys - m.named_data)
        m.named_data |= keys
    return m


def _group(buffers: dict) -> list[dict]:
    """Mutable buffers by name with layer indices folded: layers.{i}.attention.k_cache x 16."""
    groups: dict[tuple, dict] = {}
    for name, t in buffers.items():
        pattern = re.sub(r"\.\d+\.", ".{i}.", name)
        dtype = _DTYPES.get(int(t.scalar_type), (f"scalar_type {int(t.scalar_type)}", 0))[0]
        key = (pattern, dtype, tuple(t.sizes), t.allocation_info.memory_id)
        g = groups.setdefault(key, {"name": pattern, "count": 0, "dtype": dtype, "shape": list(t.sizes),
                                    "arena": t.allocation_info.memory_id, "bytes": 0})
        g["count"] += 1
        g["bytes"] += _nbytes(t)
    return sorted(groups.values(), key=lambda g: -g["bytes"])


def _total(read: dict[str, _Method], named: dict, split: bool) -> dict:
    """The whole program at load, every method loaded. Arena N of every method is one allocation,
    sized to the largest: ExecuTorch's runtime shares arenas between a program's host methods (the
    Python runtime always; Module with share_memory_arenas), and a program planned with
    share_mutable_buffers needs it (its methods read one KV cache in a shared arena). A runner that
    gives each method arenas of its own holds `planned_unshared_bytes`. Constants and named data are
    the program's: each counts once however many methods use it."""
    ids = sorted({i for m in read.values() for i in m.arenas})
    planned = sum(max(m.arenas.get(i, {"bytes": 0})["bytes"] for m in read.values()) for i in ids)
    mutable = sum(max(sum(m.arenas[i]["mutable"].values()) for m in read.values() if i in m.arenas) for i in ids)
    constants: dict[int, int] = {}
    for m in read.values():
        constants.update(m.constants)
    payloads = sum(e["payload_bytes"] for m in read.values() for e in m.delegates.values())
    total = {
        "planned_bytes": planned,
        "planned_unshared_bytes": sum(a["bytes"] for m in read.values() for a in m.arenas.values()),
        "mutable_buffers_bytes": mutable if split else None,
        "activations_bytes": planned - mutable if split else None,
        "constants_bytes": sum(constants.values()),
        # every named blob counts, also one no delegate payload was seen to reference
        "delegate_bytes": payloads + sum(named.values()),
        "shared_arenas": [],
    }
    for i in ids:
        users = [name for name, m in read.items() if m.arenas.get(i, {}).get("bytes")]
        if len(users) > 1:
            total["shared_arenas"].append({"arena": i, "bytes": max(read[n].arenas[i]["bytes"] for n in users),
                                           "methods": users})
    total["at_load_bytes"] = planned + total["constants_bytes"] + total["delegate_bytes"]
    total["biggest"] = biggest(total)
    return total


def biggest(parts: dict) -> dict:
    """The largest of the plan's parts (PARTS), by bytes; the arenas whole when unsplit."""
    candidates = {k: parts[k] for k in PARTS if parts.get(k) is not None}
    if parts.get("mutable_buffers_bytes") is None:
        candidates["planned_bytes"] = parts["planned_bytes"]
    key = max(candidates, key=candidates.get)
    return {"part": key.removesuffix("_bytes"), "name": PARTS.get(key, "planned arenas"), "bytes": candidates[key]}


def _nbytes(t) -> int:
    n = 1
    for s in t.sizes:
        n *= s
    return n * _DTYPES.get(int(t.scalar_type), ("", 0))[1]


def _constant_segment_bytes(program) -> int:
    if program.constant_segment and program.constant_segment.offsets:
        return program.segments[program.constant_segment.segment_index].size
    return sum(len(b.storage) for b in program.constant_buffer)


def size(n: int | None) -> str:
    """Bytes as `aot inspect` prints them: GiB from 1 GiB, MiB from 1 MiB, KiB below."""
    if n is None:
        return "?"
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"
