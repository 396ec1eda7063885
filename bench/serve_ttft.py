"""Time to first streamed token over HTTP (`aot serve`, the official openai client, stream=True)
against the same turn through ChatSession.turn in this process (what `aot run --chat` does).
Target: the HTTP TTFT within 10 ms of the in-process one.

    .venv/bin/python bench/serve_ttft.py                          # builds the tests' tiny chat bundle once
    .venv/bin/python bench/serve_ttft.py --bundle /tmp/t/chatb --repeats 15
    .venv/bin/python bench/serve_ttft.py --checkpoint ~/models/Llama-3.2-1B-Instruct --quant 8da4w

The bundle: --bundle, or built once into --work from --checkpoint (default: the tests' tiny random
Llama with Llama 3's 128,256-token layout and the Llama 3.2 chat template, tests/chat_fixtures.py;
fp32, 64-token prefill chunks, 4,096-token context, as tests/conftest.py's chat_bundle).

Two scenarios, greedy, the same messages for both sides: `new` (each repeat a conversation whose
first user message differs, so the prompt past the chat header is prefilled) and `repeat` (the same
conversation again: the KV cache holds all but its last token). TTFT on both sides runs from just
before the call (client.chat.completions.create / session.turn) to the first non-empty piece of
text (the stream chunk as the client parses it / on_text). The server runs in its own process
(`aot serve --port 0`); each repeat runs the in-process turn, then the HTTP one, so the machine's
load falls on both alike. --no-handoff adds the server with aot.serve.HANDOFF_S = 0 (the worker
does not wait for a streamed piece to be written before the next token's forward, which holds the
GIL): what the handoff buys. Median and spread of --repeats; load average at start and end.
Writes --out (default bench/results/serve_ttft.json).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

AOT = Path(sys.executable).with_name("aot")
TEXT = ("Summarize this for a colleague: the design review moved to Monday at 10:00, Alice will send the "
        "calendar invite, and the weather in Paris should be sunny with 18 degrees, so the offsite walk stays on.")
TARGET_MS = 10.0


def bundle_path(a) -> Path:
    if a.bundle:
        return a.bundle
    out = a.work / ("chat-fixture" if a.checkpoint is None else a.checkpoint.name + "-" + a.quant)
    if (out / "bundle.json").is_file():
        return out
    ckpt = a.checkpoint
    if ckpt is None:
        from chat_fixtures import write_chat_checkpoint

        ckpt = write_chat_checkpoint(a.work / "chat-ckpt")
    print(f"[bench] building {out} ...", flush=True)
    subprocess.run([str(AOT), "build", "--checkpoint", str(ckpt), "--out", str(out), "--quant", a.quant,
                    "--max-seq-len", "64", "--max-context-len", "4096", "--json"], check=True, stdout=subprocess.DEVNULL)
    return out


def messages(scenario: str, i: int) -> list[dict]:
    first = f"Note {i}. " if scenario == "new" else ""
    return [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": first + TEXT}]


def start_server(bundle: Path, handoff: bool) -> tuple[subprocess.Popen, dict]:
    cli = [str(bundle), "--port", "0", "--json"]
    if handoff:
        cmd = [str(AOT), "serve", *cli]
    else:
        code = ("import sys, aot.serve; aot.serve.HANDOFF_S = 0.0; from aot.cli import main; "
                f"sys.argv = ['aot', 'serve', *{cli!r}]; main()")
        cmd = [sys.executable, "-c", code]
    env = {k: v for k, v in os.environ.items() if k != "AOT_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        sys.exit("aot serve did not start")
    return proc, json.loads(line)


def timed_http(client, model: str, msgs: list[dict], n: int) -> dict:
    stamps = []
    start = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=n, temperature=0, stream=True)
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text += chunk.choices[0].delta.content
    return _row(start, stamps, text)


def timed_local(session, msgs: list[dict], n: int) -> dict:
    from aot.runner.chat import ChatOptions

    stamps, pieces = [], []

    def on_text(piece: str) -> None:
        if piece:
            stamps.append(time.perf_counter())
            pieces.append(piece)

    start = time.perf_counter()
    turn = session.turn(msgs, ChatOptions(max_new_tokens=n, temperature=0.0), on_text)
    return {**_row(start, stamps, "".join(pieces)), "prompt_tokens": turn.prompt_tokens,
            "reused_tokens": turn.reused_tokens}


def _row(start: float, stamps: list[float], text: str) -> dict:
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"ttft_ms": (stamps[0] - start) * 1000 if stamps else None, "pieces": len(stamps),
            "piece_tps": decode, "total_ms": ((stamps[-1] if stamps else time.perf_counter()) - start) * 1000,
            "text": text}


def summary(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows if r[key] is not None]
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "n": len(values)}


def measure(a, bundle: Path, session, handoff: bool) -> dict:
    import openai

    proc, info = start_server(bundle, handoff)
    client = openai.OpenAI(base_url=info["url"] + "/v1", api_key="none", max_retries=0, timeout=300)
    try:
        for i in range(2):  # warm-up, both sides: first-use costs (kernels, allocations) are not TTFT
            timed_local(session, messages("new", -1 - i), a.max_tokens)
            timed_http(client, info["model"], messages("new", -1 - i), a.max_tokens)
        out = {}
        for scenario in ("new", "repeat"):
            local, http = [], []
            if scenario == "repeat":  # its conversation into both caches first
                timed_local(session, messages(scenario, 0), a.max_tokens)
                timed_http(client, info["model"], messages(scenario, 0), a.max_tokens)
            for i in range(a.repeats):
                msgs = messages(scenario, i)
                time.sleep(a.gap)
                local.append(timed_local(session, msgs, a.max_tokens))
                time.sleep(a.gap)
                http.append(timed_http(client, info["model"], msgs, a.max_tokens))
            same = all(x["text"] == y["text"] for x, y in zip(local, http))
            out[scenario] = {"in_process": {k: summary(local, k) for k in ("ttft_ms", "piece_tps")},
                             "http": {k: summary(http, k) for k in ("ttft_ms", "piece_tps")},
                             "prompt_tokens": local[0]["prompt_tokens"],
                             "reused_tokens": summary(local, "reused_tokens")["median"],
                             "same_text": same,
                             "delta_ms": round(statistics.median(h["ttft_ms"] - x["ttft_ms"]
                                                                 for x, h in zip(local, http)), 2)}
            print(f"[bench] {'handoff' if handoff else 'no handoff'} {scenario}: {json.dumps(out[scenario])}",
                  flush=True)
        return out
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def table(result: dict) -> str:
    lines = ["| server | scenario | prompt tokens (reused) | in-process TTFT ms | HTTP TTFT ms | HTTP - in-process "
             "(median of pairs) | pieces/s in-process / HTTP | same text |", "|---|---|---|---|---|---|---|---|"]
    for name, scenarios in result["servers"].items():
        for scenario, r in scenarios.items():
            loc, http = r["in_process"], r["http"]
            lines.append(
                f"| {name} | {scenario} | {r['prompt_tokens']} ({r['reused_tokens']:g}) | "
                f"{loc['ttft_ms']['median']:.2f} [{loc['ttft_ms']['min']:.2f}, {loc['ttft_ms']['max']:.2f}] | "
                f"{http['ttft_ms']['median']:.2f} [{http['ttft_ms']['min']:.2f}, {http['ttft_ms']['max']:.2f}] | "
                f"{r['delta_ms']:+.2f} | {loc['piece_tps']['median']:.0f} / {http['piece_tps']['median']:.0f} | "
                f"{'yes' if r['same_text'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="A chat bundle [built into --work].")
    ap.add_argument("--checkpoint", type=Path, help="Build from this Instruct checkpoint [the tests' tiny chat model].")
    ap.add_argument("--quant", default="none", help="Its --quant when built [none].")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "serve_ttft")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=16, help="Tokens per turn (the rate columns count pieces).")
    ap.add_argument("--gap", type=float, default=0.2, help="Seconds idle before each turn (XNNPACK's threads spin "
                    "for a while after a call; the other side's turn should not run into them).")
    ap.add_argument("--no-handoff", action="store_true", help="Also measure a server with HANDOFF_S = 0.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_ttft.json")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)

    from aot.bundle import open_bundle
    from aot.doctor import host_info
    from aot.native import quiet_libraries
    from aot.runner.chat import ChatSession

    quiet_libraries(False)
    bundle = bundle_path(a)
    load_start = os.getloadavg()
    session = ChatSession(open_bundle(bundle))
    servers = {"aot serve": measure(a, bundle, session, handoff=True)}
    if a.no_handoff:
        servers["aot serve, HANDOFF_S = 0"] = measure(a, bundle, session, handoff=False)
    manifest = session.bundle.manifest
    result = {"bundle": str(bundle), "model": manifest["model"]["name"], "quant": manifest["quant"]["plan"]["scheme"],
              "max_seq_len": manifest["export"]["max_seq_len"], "max_context_len": manifest["export"]["max_context_len"],
              "repeats": a.repeats, "max_tokens": a.max_tokens, "gap_s": a.gap, "target_ms": TARGET_MS, "servers": servers,
              "within_target": all(r["delta_ms"] <= TARGET_MS for r in servers["aot serve"].values()),
              "load_average": {"start": [round(x, 2) for x in load_start],
                               "end": [round(x, 2) for x in os.getloadavg()]},
              "machine": host_info(), "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"target: HTTP TTFT within {TARGET_MS:g} ms of in-process: {'met' if result['within_target'] else 'NOT met'}")


if __name__ == "__main__":
    main()
