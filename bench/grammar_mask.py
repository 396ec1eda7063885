"""Per-token mask cost of grammar-constrained tool calls at Llama 3's 128,256-token vocabulary, for
the three candidate libraries: llguidance, xgrammar and outlines-core. Picks the library aot builds
its tool-call constraint on (target: median mask <= 1 ms per token on the project's machine).

    .venv/bin/pip install outlines-core==0.2.14 && .venv/bin/pip install --no-deps xgrammar==0.2.9  # bench only
    .venv/bin/python tools/llama3_sized_tokenizer.py --out build/llama3-sized-tokenizer   # once
    .venv/bin/python bench/grammar_mask.py                 # -> bench/results/grammar_mask.json
    .venv/bin/python bench/grammar_mask.py --libs llguidance,xgrammar --sequences 50 --repeats 1

The grammar: a Llama 3.2 JSON tool call, `{"name": "<tool>", "parameters": {...}}`, over the eight
OpenAI-style function schemas in TOOLS below (strings with pattern / format, enums,
bounded integers and numbers, booleans, a nullable type, arrays with item bounds, nested objects,
required and optional fields, a tool without arguments), as one JSON schema:
{"anyOf": [{"type": "object", "properties": {"name": {"const": NAME}, "parameters": SCHEMA},
"required": ["name", "parameters"], "additionalProperties": false}, ...]}. Every object schema gets
"additionalProperties": false (OpenAI strict mode's rule; xgrammar's strict_mode does the same).
Formatting is Llama's: separators ", " and ": ", no other whitespace (llguidance
whitespace_flexible=False with those separators; xgrammar any_whitespace=False with them;
outlines-core has no separator option, so its whitespace pattern is " ?", which also admits
Llama's format). Stop token: <|eot_id|> (128009).

Per library: the tokenizer setup (token bytes -> the library's vocabulary object), the grammar
compile (schema -> what a matcher is made from; xgrammar precomputes its token-mask cache here,
llguidance builds lazily during the first masks, outlines-core builds the whole regex x vocabulary
index), then --sequences tool calls, each from a fresh matcher: every step computes the next-token
bitmask (timed: that call alone, int32 words, 4,008 per step), then samples a random allowed token
with a seeded generator (per sequence, the same seeds for every library) and consumes it, until the
stop token is allowed (the grammar accepts: it is taken) or --max-tokens. Uniform sampling over
128k tokens would almost never close a string (nearly every token is allowed inside one), so with
probability --close-prob the draw is among the allowed tokens holding a JSON delimiter (" , } ]),
or where there are none, among the allowed tokens without a digit (ends numbers and fractions).
Each finished call's bytes are decoded and checked: UTF-8, json.loads, and jsonschema
(Draft 2020-12, with its format checker: date and email are checked, date-time needs an extra
package and is not) against the whole schema, i.e. against its tool's parameters.

The libraries run interleaved (all of them once per --repeats round) so that the machine's load
falls on each alike. This machine has 2 cores shared with other work: timings are noisy, and the
load average at start and end is recorded.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 128_256
EOT = 128_009  # <|eot_id|>
N_BPE = 128_000  # ids below are byte-level BPE tokens, the rest Llama 3's special tokens
LIBS = ("llguidance", "xgrammar", "outlines-core")
DEFAULT_TOKENIZER = ROOT / "build" / "llama3-sized-tokenizer" / "tokenizer.json"


def fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


DATE = {"type": "string", "format": "date"}
TOOLS = [
    fn("get_weather", "Current weather for a city.", {
        "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    }, ["location"]),
    fn("search_flights", "Search flights between two airports.", {
        "origin": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "IATA code"},
        "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "date": DATE,
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
        "cabin": {"type": "string", "enum": ["economy", "premium_economy", "business", "first"]},
        "nonstop": {"type": "boolean"},
    }, ["origin", "destination", "date"]),
    fn("create_event", "Add an event to the calendar.", {
        "title": {"type": "string"},  # --bounded: maxLength
        "start": {"type": "string", "format": "date-time"},
        "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 1440},
        "attendees": {"type": "array", "items": {"type": "string", "format": "email"}},  # --bounded: maxItems
        "reminder": {"type": "object", "properties": {
            "minutes_before": {"type": "integer", "minimum": 0},
            "method": {"type": "string", "enum": ["email", "popup"]},
        }, "required": ["minutes_before", "method"]},
    }, ["title", "start"]),
    fn("set_thermostat", "Set the thermostat.", {
        "temperature": {"type": "number", "minimum": 10, "maximum": 30},
        "mode": {"type": "string", "enum": ["heat", "cool", "auto", "off"]},
        "hold": {"type": "boolean"},
    }, ["temperature", "mode"]),
    fn("send_message", "Send a message to a contact.", {
        "recipient": {"type": "string"},
        "body": {"type": "string"},
        "priority": {"type": "string", "enum": ["low", "normal", "high"]},
        "attachments": {"type": "array", "items": {"type": "object", "properties": {
            "filename": {"type": "string"},
            "size_bytes": {"type": "integer", "minimum": 0},
        }, "required": ["filename"]}},
    }, ["recipient", "body"]),
    fn("add_todos", "Add items to a to-do list.", {
        "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {"type": "object", "properties": {
            "text": {"type": "string"},
            "done": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "due": {"type": "object", "properties": {"date": DATE, "all_day": {"type": "boolean"}},
                    "required": ["date"]},
        }, "required": ["text", "done"]}},
        "list": {"type": "string", "enum": ["personal", "work", "shopping"]},
    }, ["items"]),
    fn("calculate", "Evaluate an arithmetic expression.", {
        "expression": {"type": "string"},
        "precision": {"type": "integer", "minimum": 0, "maximum": 12},
        "unit": {"type": ["string", "null"]},
    }, ["expression"]),
    fn("get_current_time", "The current local time.", {}, []),
]


def bounded(tools: list[dict]) -> list[dict]:
    """TOOLS with create_event's title at most 80 characters and at most 10 attendees: bounds that
    llguidance and xgrammar compile at once but outlines-core's index cannot be built for in minutes
    at this vocabulary (maxLength 10: 1.4 s, 20: 197 s; an email array with maxItems 10: > 120 s)."""
    tools = json.loads(json.dumps(tools))
    for t in tools:
        if t["function"]["name"] == "create_event":
            props = t["function"]["parameters"]["properties"]
            props["title"]["maxLength"] = 80
            props["attendees"]["maxItems"] = 10
    return tools


def strict(schema):
    """A copy with "additionalProperties": false on every object schema that does not say."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("properties", "items", "anyOf", "oneOf", "allOf") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def tool_call_schema(tools: list[dict]) -> dict:
    """One JSON schema for a Llama 3.2 JSON tool call to any of `tools` (OpenAI format)."""
    return {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": t["function"]["name"]}, "parameters": strict(t["function"]["parameters"])},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]}


# --- the three libraries, behind one small interface ------------------------------------------------

class Llguidance:
    name = "llguidance"
    modules = ("llguidance", "llguidance.torch")  # imported before anything is timed

    def setup(self, tokenizer_json: str, token_bytes: list[bytes]) -> None:
        import llguidance
        import llguidance.torch  # (imported before timing: its import, torch.compile included, takes seconds)

        self._fill = llguidance.torch.fill_next_token_bitmask
        # The HF tokenizer.json text itself: llguidance reads the vocabulary and which ids are special.
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=VOCAB, eos_token=EOT)

    def compile(self, schema: dict) -> None:
        from llguidance import LLMatcher

        self.grammar = LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        m = LLMatcher(self.tok, self.grammar, log_level=1)
        if m.is_error():
            raise RuntimeError(m.get_error())
        self.warnings = m.get_grammar_warnings()

    def start(self):
        from llguidance import LLMatcher

        return LLMatcher(self.tok, self.grammar, log_level=1)

    def fill(self, m, bitmask) -> None:
        self._fill(m, bitmask)  # llguidance.torch.fill_next_token_bitmask

    def consume(self, m, token: int) -> bool:
        return m.consume_token(token)

    def accepted(self, m) -> bool:  # after the stop token was consumed
        return m.is_accepting() and m.is_stopped() and not m.is_error()


class Xgrammar:
    name = "xgrammar"
    modules = ("xgrammar",)

    def setup(self, tokenizer_json: str, token_bytes: list[bytes]) -> None:
        import xgrammar as xgr

        # RAW vocabulary: each id's bytes; special tokens as b"" so xgrammar treats them as special.
        vocab = [b if i < N_BPE else b"" for i, b in enumerate(token_bytes)]
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=[EOT])

    def compile(self, schema: dict) -> None:
        import xgrammar as xgr

        compiler = xgr.GrammarCompiler(self.info, max_threads=os.cpu_count() or 1, cache_enabled=False)
        self.compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     separators=(", ", ": "), strict_mode=True)
        self.warnings = []

    def start(self):
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compiled)

    def fill(self, m, bitmask) -> None:
        m.fill_next_token_bitmask(bitmask)

    def consume(self, m, token: int) -> bool:
        return m.accept_token(token)

    def accepted(self, m) -> bool:
        return m.is_terminated()


class OutlinesCore:
    name = "outlines-core"
    modules = ("outlines_core", "outlines_core.json_schema")

    def setup(self, tokenizer_json: str, token_bytes: list[bytes]) -> None:
        import outlines_core

        # bytes -> ids for the BPE tokens; the eos id is given apart (special tokens left out).
        table: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes[:N_BPE]):
            table.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(EOT, table)

    def compile(self, schema: dict) -> None:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.regex = build_regex_from_schema(json.dumps(schema), " ?")
        self.index = outlines_core.Index(self.regex, self.vocab)
        self.warnings = []

    def start(self):
        import outlines_core

        return outlines_core.Guide(self.index)

    def fill(self, g, bitmask) -> None:
        g.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())

    def consume(self, g, token: int) -> bool:
        if token == EOT:  # the Guide has no state after eos: finished is the accepting check
            return g.is_finished()
        try:
            g.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True

    def accepted(self, g) -> bool:
        return g.is_finished()


ADAPTERS = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}
PACKAGES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}


# --- the measurement ----------------------------------------------------------------------------------

def closing_tokens(token_bytes: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(ids whose bytes hold a JSON delimiter " , } ], ids without a digit): the draws that end strings
    and containers, and, where no delimiter may come yet, those that end a run of digits (a
    date-time's fraction of a second goes on until its time zone)."""
    delim = np.array([i < N_BPE and any(c in b for c in b'",}]') for i, b in enumerate(token_bytes)])
    digitless = np.array([i < N_BPE and not any(48 <= c <= 57 for c in b) for i, b in enumerate(token_bytes)])
    return delim, digitless


def run_library(lib, schema: dict, validator, token_bytes, closers, args, script=None) -> tuple[dict, list]:
    """(stats row, the token ids of each finished call). With `script` (such lists from another
    library), each call replays those ids instead of sampling: the masks are then timed in exactly
    the same parser states, and a scripted id the mask forbids ends that call as "rejected"."""
    import torch

    gc.collect()
    compile_s = None
    if script is None:  # a replay reuses the grammar compiled for the sampled run
        start = time.perf_counter()
        lib.compile(schema)
        compile_s = round(time.perf_counter() - start, 3)
    bitmask = torch.full((1, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    words = bitmask.numpy().view(np.uint8)
    mask_ns, first_ns, create_ns, allowed_counts = [], [], [], []
    slowest = {"ms": -1.0}
    finished = parsed = valid = unfinished = rejected = dead = not_accepted = 0
    per_tool: dict[str, int] = {}
    failures, samples, finished_tokens = [], [], []
    n_sequences = len(script) if script is not None else args.sequences
    for seq in range(n_sequences):
        rng = np.random.default_rng([args.seed, seq])
        t0 = time.perf_counter_ns()
        m = lib.start()
        create_ns.append(time.perf_counter_ns() - t0)
        tokens: list[int] = []
        outcome = "unfinished"
        gc.disable()
        try:
            for step in range(args.max_tokens + 1):
                t0 = time.perf_counter_ns()
                lib.fill(m, bitmask)
                dt = time.perf_counter_ns() - t0
                mask_ns.append(dt)
                if step == 0:
                    first_ns.append(dt)
                if dt / 1e6 > slowest["ms"]:
                    slowest = {"ms": _r(dt / 1e6), "sequence": seq, "step": step,
                               "after": b"".join(token_bytes[t] for t in tokens)[-120:].decode(errors="replace")}
                bits = np.unpackbits(words, bitorder="little")[:VOCAB].astype(bool)
                allowed_counts.append(int(bits.sum()))
                if script is not None:
                    token = script[seq][step]
                    if not bits[token]:
                        outcome = "rejected"
                        break
                elif bits[EOT]:
                    token = EOT
                else:
                    allowed = np.flatnonzero(bits)
                    if allowed.size == 0:
                        outcome = "dead end"
                        break
                    if rng.random() < args.close_prob:
                        for closer in closers:
                            closing = np.flatnonzero(bits & closer)
                            if closing.size:
                                allowed = closing
                                break
                    token = int(allowed[rng.integers(allowed.size)])
                if step == args.max_tokens and token != EOT:
                    break
                if not lib.consume(m, token):
                    outcome = "rejected"
                    break
                if token == EOT:
                    outcome = "finished" if lib.accepted(m) else "not accepted"
                    break
                tokens.append(token)
        finally:
            gc.enable()
        if outcome != "finished":
            unfinished += outcome == "unfinished"
            rejected += outcome == "rejected"
            dead += outcome == "dead end"
            not_accepted += outcome == "not accepted"
            failures.append({"sequence": seq, "outcome": outcome, "tokens": len(tokens),
                             "tail": b"".join(token_bytes[t] for t in tokens)[-200:].decode(errors="replace")})
            continue
        finished += 1
        finished_tokens.append(tokens + [EOT])
        raw = b"".join(token_bytes[t] for t in tokens)
        try:
            call = json.loads(raw.decode("utf-8"))
            parsed += 1
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            failures.append({"sequence": seq, "outcome": f"not JSON: {e}", "text": raw[:300].decode(errors="replace")})
            continue
        errors = sorted(validator.iter_errors(call), key=lambda e: e.path)
        name = call.get("name") if isinstance(call, dict) else None
        per_tool[str(name)] = per_tool.get(str(name), 0) + 1
        if not errors:
            valid += 1
        else:
            failures.append({"sequence": seq, "outcome": "schema", "text": raw[:300].decode(errors="replace"),
                             "error": _tool_error(call, schema)})
        if len(samples) < 3:
            samples.append(raw[:400].decode(errors="replace"))
    ms = np.array(mask_ns) / 1e6
    return {
        "library": lib.name, "version": version(PACKAGES[lib.name]),
        "compile_s": compile_s, "grammar_warnings": list(lib.warnings)[:5],
        "mode": "replay" if script is not None else "sampled",
        "sequences": n_sequences, "finished": finished, "parsed": parsed, "valid": valid,
        "unfinished": unfinished, "rejected": rejected, "dead_ends": dead, "not_accepted": not_accepted,
        "tokens_stepped": int(ms.size),
        "mask_ms": {"median": _r(np.median(ms)), "p90": _r(np.percentile(ms, 90)), "p99": _r(np.percentile(ms, 99)),
                    "max": _r(ms.max()), "mean": _r(ms.mean())},
        "first_mask_ms_median": _r(np.median(first_ns) / 1e6),
        "matcher_create_ms_median": _r(np.median(create_ns) / 1e6),
        "allowed_tokens_median": int(np.median(allowed_counts)), "slowest_mask": slowest,
        "per_tool": dict(sorted(per_tool.items())), "failures": failures[:10], "samples": samples,
    }, finished_tokens


def _tool_error(call, schema: dict) -> str:
    """The first validation error against the named tool's own parameters schema (clearer than anyOf's)."""
    import jsonschema

    name = call.get("name") if isinstance(call, dict) else None
    branch = next((b for b in schema["anyOf"] if b["properties"]["name"]["const"] == name), None)
    if branch is None:
        return f"no tool named {name!r}"
    v = jsonschema.Draft202012Validator(branch["properties"]["parameters"],
                                        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    err = next(iter(sorted(v.iter_errors(call.get("parameters")), key=lambda e: e.path)), None)
    return f"{list(err.path)}: {err.message[:200]}" if err else "wrapper"


def _r(x) -> float:
    return round(float(x), 4)


def table(rows: list[dict]) -> str:
    head = (f"{'library':<14} {'version':<8} {'compile s':>9} {'valid/N':>8} {'tokens':>7} {'median':>8} "
            f"{'p90':>8} {'p99':>8} {'max':>8} {'mean':>8} {'first':>7}   (mask ms)")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['library']:<14} error: {r['error'][:100]}")
            continue
        m = r["mask_ms"]
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.3f}"
        lines.append(f"{r['library']:<14} {r['version']:<8} {compile_s:>9} {r['valid']:>4}/{r['sequences']:<3} "
                     f"{r['tokens_stepped']:>7} {m['median']:>8.3f} {m['p90']:>8.3f} {m['p99']:>8.3f} {m['max']:>8.3f} "
                     f"{m['mean']:>8.3f} {r['first_mask_ms_median']:>7.3f}")
    return "\n".join(lines)


def main() -> None:
    import jsonschema
    from tokenizers import Tokenizer

    from aot.doctor import host_info
    from aot.runner.text import TokenBytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                    help="a 128,256-id tokenizer.json (tools/llama3_sized_tokenizer.py writes one)")
    ap.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated, of {', '.join(LIBS)}")
    ap.add_argument("--sequences", type=int, default=200, help="tool calls per library per round")
    ap.add_argument("--max-tokens", type=int, default=400, help="a call still open after this many is unfinished")
    ap.add_argument("--close-prob", type=float, default=0.3,
                    help="chance that a step draws among the allowed tokens that close (see the docstring)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds (each library once per round, interleaved)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay-from", default="llguidance",
                    help="after each round, every library replays this library's finished calls ('' for none)")
    ap.add_argument("--bounded", action="store_true",
                    help="add create_event's maxLength 80 title and maxItems 10 attendees (outlines-core cannot build them)")
    ap.add_argument("--target-ms", type=float, default=1.0, help="the project's median mask cost target")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grammar_mask.json")
    a = ap.parse_args()
    libs = [s.strip() for s in a.libs.split(",") if s.strip()]
    unknown = set(libs) - set(LIBS)
    if unknown:
        ap.error(f"unknown --libs {sorted(unknown)}; choose from {', '.join(LIBS)}")
    if not a.tokenizer.is_file():
        sys.exit(f"{a.tokenizer}: no such file; run .venv/bin/python tools/llama3_sized_tokenizer.py "
                 f"--out {a.tokenizer.parent}")

    tokenizer_json = a.tokenizer.read_text()
    n = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
    if n != VOCAB:
        sys.exit(f"{a.tokenizer}: {n} ids, not {VOCAB}")
    table_ = TokenBytes(a.tokenizer).table
    token_bytes = [table_[i] for i in range(VOCAB)]
    closers = closing_tokens(token_bytes)
    tools = bounded(TOOLS) if a.bounded else TOOLS
    schema = tool_call_schema(tools)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    jsonschema.Draft202012Validator.check_schema(schema)

    load_start = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load_start[0]:.2f} (shared: timings are noisy)", flush=True)
    adapters, setup = {}, {}
    for name in libs:
        lib = ADAPTERS[name]()
        for module in lib.modules:
            importlib.import_module(module)
        start = time.perf_counter()
        try:
            lib.setup(tokenizer_json, token_bytes)
        except Exception as e:  # a library that cannot take the vocabulary is reported, not fatal
            setup[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: tokenizer setup failed: {e}", flush=True)
            continue
        setup[name] = {"tokenizer_setup_s": round(time.perf_counter() - start, 3)}
        adapters[name] = lib
        print(f"{name}: tokenizer setup {setup[name]['tokenizer_setup_s']:.2f} s", flush=True)

    rounds, replays = [], []
    for rnd in range(a.repeats):
        rows, scripts = [], {}
        for name in libs:
            if name not in adapters:
                rows.append({"library": name, **setup[name]})
                continue
            print(f"round {rnd + 1}: {name} ...", flush=True)
            try:
                row, scripts[name] = run_library(adapters[name], schema, validator, token_bytes, closers, a)
            except Exception as e:
                row = {"library": name, "error": f"{type(e).__name__}: {e}"}
            row.update(setup[name])
            rows.append(row)
        rounds.append(rows)
        print(f"\nround {rnd + 1} of {a.repeats}: {a.sequences} sampled tool calls per library, vocab {VOCAB}")
        print(table(rows), flush=True)
        source = a.replay_from if a.replay_from in scripts else None
        if a.replay_from and source is None:
            print(f"no calls from {a.replay_from} to replay", flush=True)
        if source:
            rows = []
            for name in libs:
                if name not in adapters:
                    continue
                try:  # the compiled grammar is reused from the sampled run above
                    row, _ = run_library(adapters[name], schema, validator, token_bytes, closers, a,
                                         script=scripts[source])
                except Exception as e:
                    row = {"library": name, "error": f"{type(e).__name__}: {e}"}
                row["replayed_from"] = source
                rows.append(row)
            replays.append(rows)
            print(f"\nround {rnd + 1}: the {len(scripts[source])} finished calls of {source}, replayed by each library "
                  "(same parser states)")
            print(table(rows), flush=True)

    load_end = os.getloadavg()
    verdict = {}
    for kind, groups in (("sampled", rounds), ("replay", replays)):
        for rows in groups:
            for r in rows:
                if "mask_ms" in r:
                    verdict.setdefault(r["library"], {}).setdefault(f"median_ms_{kind}", []).append(r["mask_ms"]["median"])
    for v in verdict.values():
        v["meets_target"] = max(m for meds in v.values() for m in meds) <= a.target_ms
    print(f"\ntarget: median mask <= {a.target_ms} ms per token at {VOCAB} ids")
    for lib, v in verdict.items():
        meds = ", ".join(f"{k[10:]} {v[k]}" for k in v if k.startswith("median_ms_"))
        print(f"  {lib:<14} {'meets' if v['meets_target'] else 'misses'}  (medians: {meds})")
    print(f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end, on {os.cpu_count()} shared cores")

    result = {
        "vocab_size": VOCAB, "tokenizer": str(a.tokenizer), "stop_token": EOT,
        "tools": [t["function"]["name"] for t in tools], "schema": schema,
        "settings": {"bounded": a.bounded, "replay_from": a.replay_from, "sequences": a.sequences, "max_tokens": a.max_tokens, "close_prob": a.close_prob,
                     "repeats": a.repeats, "seed": a.seed},
        "target_median_ms": a.target_ms, "verdict": verdict, "setup": setup, "rounds": rounds,
        "replays": replays,
        "machine": host_info(), "load_average": {"start": list(load_start), "end": list(load_end)},
        "note": "shared machine: other work runs on the same cores, so timings are noisy",
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
