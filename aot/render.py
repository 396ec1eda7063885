"""Human-readable views of the commands' results (plain dicts): each function prints one result to a
rich Console and holds no logic beyond formatting. `--json` prints the same dicts instead."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from aot.bundle import PTE_NAME
from aot.memplan import size


def bundle(out: Console, b: dict, verified: bool) -> None:
    """`aot build` and `aot inspect`."""
    m = b["model"]
    q = b["quant"]["plan"]
    out.print(f"[bold]{b['path']}[/bold]" + ("  [green]sha256 ok[/green]" if verified else ""))
    weights = "random weights" if m["random_weights"] else (b.get("checkpoint") or {}).get("path", "?")
    out.print(f"  model     {m['name']} ({m['num_params'] / 1e6:.1f} M params) from {weights}")
    recipe = ", ".join(f"{k} {v['bits']}-bit" + (f" g{v['group_size']}" if v["group_size"] else " per-channel")
                       for k, v in (("linear", q["linear"]), ("embedding", q["embedding"]), ("output", q["output"])) if v)
    out.print(f"  quant     {q['scheme']} ({recipe or q['dtype']})   delegate {b['delegate']}")
    image = b.get("image")
    if image:
        out.print(f"  image     up to {image['max_tiles']} tiles of {image['tile_size']} px, {image['image_token']} = "
                  f"{image['image_token_id']}; vision encoder {b['quant']['vision']['scheme']}")
    rot = b["quant"].get("rotation")
    if rot:
        if rot["source"] == "file":
            source = f"learned, {rot['file']} sha256 {rot['sha256'][:16]}"
        else:
            source = rot["source"] + (f", seed {rot['seed']}" if "seed" in rot else "")
        extra = "; embedding and output stored apart" if rot.get("untied_embedding") else ""
        out.print(f"  rotation  {source}; {rot.get('r4', 'no R4')}{extra}")
    e = b["export"]
    out.print(f"  lengths   max_seq_len {e['max_seq_len']}, max_context_len {e['max_context_len']}   "
              f"bos {b['bos_id']} eos {b['eos_ids']}")
    chat = b.get("chat")
    if chat:
        stops = ", ".join(f"{t} {i}" for t, i in chat["stop_ids"].items())
        tools = f"tool calls {chat['tool_calls']['format']}" if chat.get("tool_calls") else "no tool calls"
        out.print(f"  chat      template from {chat['source']} (sha256 {chat['template_sha256'][:16]}); turns end "
                  f"{stops}; {tools}")
    for a in b.get("adapters") or []:
        where = f"{a['file']}" if a.get("name") else "in model.pte"
        quant = f", {a['quant']}" if a.get("quant") else ""
        at_load = f"; {a['at_load_bytes'] / 2**20:.1f} MiB at load" if a.get("at_load_bytes") else ""
        out.print(f"  adapter   {a.get('name') or a['kind']}: {a['kind']} rank {a['rank']} x{a['scale']:g} on "
                  f"{len(a['targets'])} projections of {len(a['layers'])} layers, {a['mode']}{quant}, {where}{at_load}")
    for name, f in b["files"].items():
        out.print(f"  {name:<16} {f['bytes'] / 2**20:10.2f} MiB  sha256 {f['sha256'][:16]}")
    for name, d in b["delegation"].items():
        cpu = ", ".join(f"{op} x{n}" for op, n in d["cpu_ops"].items()) or "none"
        out.print(f"  {name}: {d['delegated_ops']}/{d['total_ops']} ops delegated in "
                  f"{d['delegated_subgraphs']} subgraphs; on CPU: {cpu}")
    if "build" in b:
        out.print(f"  built in {b['build']['total_seconds']:.1f} s, peak RSS {b['build']['peak_rss_mib'] / 1024:.2f} GiB")
    if b.get("memory_plan"):
        memory_plan(out, b["memory_plan"], ((b.get("build") or {}).get("preflight") or {}).get("runtime"))


def memory_plan(out: Console, p: dict, predicted: dict | None = None) -> None:
    """The runtime memory plan (aot.memplan) of `aot build` and `aot inspect`, and the prediction
    the build made before it started (aot.preflight.runtime)."""
    t = p["total"]
    out.print(f"  memory    {size(t['at_load_bytes'])} at load: planned {size(t['planned_bytes'])}, delegate "
              f"{size(t['delegate_bytes'])}, constants {size(t['constants_bytes'])} (mmapped)"
              + (f", external weights {size(t['external_bytes'])} (model.ptd)" if t.get("external_bytes") else "")
              + "; biggest: "
              f"{t['biggest']['name']} {size(t['biggest']['bytes'])}")
    idle = [name for name, m in p["methods"].items() if not (m["planned_bytes"] or m["delegate_bytes"] or m["constants_bytes"])]
    for name, m in p["methods"].items():
        if name in idle:
            continue
        split = (f" = KV cache {size(m['mutable_buffers_bytes'])} + activations {size(m['activations_bytes'])}"
                 + (f" + {size(m['unused_arena_bytes'])} of arenas it plans nothing into" if m["unused_arena_bytes"] else "")
                 if m["mutable_buffers_bytes"] is not None else " (the program names no mutable buffer: cache and "
                 "activations not told apart)")
        delegates = "".join(f"; {d} {size(e['payload_bytes'] + e['named_data_bytes'])} in {e['subgraphs']} subgraphs"
                            for d, e in m["delegates"].items())
        out.print(f"    {name:<14} planned {size(m['planned_bytes'])}{split}{delegates}; constants {size(m['constants_bytes'])}")
        for g in m["mutable_buffers"]:
            out.print(f"    {'':<14} {g['name']} {g['dtype']} {g['shape']} x {g['count']}: {size(g['bytes'])}")
    if idle:
        out.print(f"    {len(idle)} constant methods ({', '.join(idle[:3])}{', ...' if len(idle) > 3 else ''}): nothing planned")
    for a in t.get("shared_arenas", []):
        out.print(f"    arena {a['arena']} shared by {', '.join(a['methods'])}: one allocation of {size(a['bytes'])}")
    for u in p.get("unknown", []):
        out.print(f"    not counted: {u}")
    if predicted:
        fit = ""
        if "device_memory_bytes" in predicted:
            fit = f", fits --device-memory {size(predicted['device_memory_bytes'])}"
        out.print(f"    predicted before building: {size(predicted['at_load_bytes'])} at load{fit}")


def targets(out: Console, root: Path, results: list[dict]) -> None:
    """`aot build --manifest`: one line per target."""
    out.print(f"[bold]{root}[/bold]")
    for r in results:
        color = {"built": "green", "skipped": "cyan"}.get(r["status"], "red")
        size = f"{r['pte_bytes'] / 2**20:9.2f} MiB" if "pte_bytes" in r else " " * 13
        secs = f"{r['seconds']:7.1f} s" if "seconds" in r else " " * 9
        note = r.get("reason") or (r.get("error") or {}).get("message", "")
        out.print(f"  [{color}]{r['status']:<9}[/{color}] {r['name']:<36} {secs} {size}  {r['out']}  {note}")


def release(out: Console, index: dict) -> None:
    """`aot release`: the index written, one line per target."""
    out.print(f"[bold]{index['path']}[/bold]  ({len(index['targets'])} targets)")
    for t in index["targets"]:
        v = t["validation"]
        gates = "no gates" if v is None else ("gates pass" if v["ok"] else "GATES FAIL")
        out.print(f"  {t['name']:<36} {t['build']['status']:<8} "
                  f"{t['files'][PTE_NAME]['bytes'] / 2**20:9.2f} MiB  {gates}")
    s = index.get("storage")
    if s and s["unique_bytes"] < s["bytes"]:
        out.print(f"  stored by content: {s['unique_bytes'] / 2**20:.2f} MiB of {s['bytes'] / 2**20:.2f} MiB "
                  f"({s['files'] - s['unique_files']} files shared between targets)")


def text_chunk(text: str) -> None:
    """`aot run`: generated text as it streams (plain stdout, unbuffered)."""
    print(text, end="", flush=True)


def generation(err: Console, g) -> None:
    """`aot run`, after the streamed text: its timings (on stderr)."""
    print(flush=True)
    if g.image_s:
        err.print(f"[dim]image encoder {g.image_s * 1000:.0f} ms[/dim]")
    err.print(f"[dim]{g.engine}: load {g.load_s * 1000:.0f} ms, first token {g.ttft_s * 1000:.1f} ms, "
              f"prefill {g.prefill_tps:.1f} tok/s ({g.prompt_tokens} tokens), "
              f"decode {g.decode_tps:.1f} tok/s ({g.generated_tokens} tokens)[/dim]")
    if g.prompt_truncated_from:
        err.print(f"[yellow]prompt truncated (--truncate-prompt): kept BOS and its last {g.prompt_tokens - 1} of "
                  f"{g.prompt_truncated_from - 1} tokens to fit the {g.max_context_len}-token context[/yellow]")
    if g.stop_reason == "context":
        err.print(f"[yellow]stopped at the bundle's context: {g.prompt_tokens} prompt + {g.generated_tokens} generated "
                  f"tokens fill all {g.max_context_len}; rebuild with a larger --max-context-len to go on[/yellow]")


def chat_turn(out: Console, err: Console, t) -> None:
    """`aot run --chat`: after a turn's streamed text, its call (stdout) and timings (stderr)."""
    import json

    if t.tool_call is not None:
        print(json.dumps(t.tool_call), flush=True)
    else:
        print(flush=True)
    err.print(f"[dim]first token {t.ttft_s * 1000:.1f} ms ({t.prompt_tokens - t.reused_tokens} new prompt tokens, "
              f"{t.reused_tokens} kept in the KV cache), decode {t.decode_tps:.1f} tok/s ({t.generated_tokens} tokens), "
              f"{t.finish_reason}[/dim]")
    if t.dropped_messages:
        err.print(f"[yellow]the context ({t.max_context_len} tokens) was full: the {t.dropped_messages} oldest messages "
                  "were dropped[/yellow]")
    if t.finish_reason == "context":
        err.print(f"[yellow]stopped at the bundle's context ({t.max_context_len} tokens); the next turn drops the "
                  "oldest messages[/yellow]")


def simulation(out: Console, result: dict) -> None:
    """`aot simulate`."""
    a = result["accuracy"]
    kv = f", {result['kv_bits']}-bit KV cache" if result["kv_bits"] else ""
    out.print(f"[bold]{result['delegate']} {result['soc']} {result['scheme']}{kv}[/bold] (simulated) vs "
              f"{result['checkpoint']} fp32")
    out.print(f"  text       {result['text']['file']} ({result['text']['tokens']} tokens: prefill "
              f"{result['prefill_len']}, then decode); calibration "
              f"{result['calibration']['windows']} x {result['calibration']['tokens_each']} tokens")
    accuracy(out, a, "simulated")
    out.print(f"  top-1 in prefill {result['accuracy_prefill']['top1_agreement']:.2%}, in decode "
              f"{result['accuracy_decode']['top1_agreement']:.2%}")


def validation(out: Console, r: dict) -> None:
    """`aot validate` on this host."""
    a, s = r["accuracy"], r["speed"]
    ref = r["reference"]
    out.print(f"[bold]{r['bundle']}[/bold]  ({r['model']}, {r['quant']})  vs  {ref['checkpoint']} fp32"
              + ("" if ref["is_build_input"] else "  [yellow](not the build's input files)[/yellow]"))
    out.print(f"  text       {r['text']['file']} ({r['text']['tokens']} tokens, {a['positions']} predictions)")
    accuracy(out, a, "bundle")
    buckets = a.get("by_depth") or []
    if len(buckets) > 1:
        for b in buckets:
            out.print(f"    depth {b['depth']:<9} {b['positions']:>6} positions  ppl ratio {b['ppl_ratio']:.4f}  "
                      f"top-1 {b['top1_agreement']:.2%}  KL {b['kl_mean']:.5f}")
    effect = r.get("image_effect")
    if effect:
        out.print(f"  image      without it the reference moves by mean KL {effect['kl_mean']:.5f}, top-1 "
                  f"{effect['top1_agreement']:.2%}; encoder {s['image_encoder_s']['median'] * 1000:.0f} ms per image")
        for i in r["images"]:
            out.print(f"    {i['image']:<20} {i['tiles']} tiles  KL {i['kl_mean']:.5f}  top-1 {i['top1_agreement']:.2%}  "
                      f"image effect KL {i['image_effect_kl']:.5f}")
        s = None
    if s and s.get("defaults_shrunk"):
        out.print(f"  lengths    the speed run's defaults ({s['prompt_tokens_requested']} + {s['decode_tokens_requested']}"
                  f" tokens) shrunk to fit the bundle's context; --prompt-tokens/--decode-tokens choose")
    if s:
        out.print(f"  speed      load {s['load_s'] * 1000:.0f} ms; prefill {s['prefill_tps']['median']:.1f} tok/s "
                  f"({s['prompt_tokens']} tokens), decode {s['decode_tps']['median']:.1f} tok/s "
                  f"({s['generated_tokens']} tokens), median of {len(s['decode_tps']['runs'])} "
                  f"(decode {s['decode_tps']['min']:.1f}-{s['decode_tps']['max']:.1f}); peak RSS {s['peak_rss_mib']:.0f} MiB")
    for g in r["gates"]:
        mark = "[green]pass[/green]" if g["ok"] else "[red]FAIL[/red]"
        out.print(f"  gate       {mark} {g['name']}: {g['value']} {g['op']} {g['threshold']}")


def accuracy(out: Console, a: dict, label: str) -> None:
    out.print(f"  perplexity reference {a['ppl_reference']:.3f}  {label} {a['ppl_bundle']:.3f}  ratio {a['ppl_ratio']:.4f}")
    out.print(f"  agreement  top-1 {a['top1_agreement']:.2%}  mean KL {a['kl_mean']:.5f}  "
              f"max |logit error| {a['max_abs_logit_error']:.4f}")


def device_validation(out: Console, result: dict) -> None:
    """`aot validate --device`."""
    d = result["device"]
    out.print(f"[bold]{result['model']}[/bold] ({result['quant']}) on {d.get('name')}: "
              f"{d.get('model') or d.get('uname', '')} {d.get('cpu', '')}, {d.get('cores', '?')} cores, "
              f"{d.get('memory_mib', '?')} MiB")
    t = result.get("text") or {}
    if t.get("defaults_shrunk"):
        out.print(f"  lengths {t['prompt_tokens']} + {t['new_tokens']} tokens per prompt (the defaults "
                  f"{t['prompt_tokens_requested']} + {t['new_tokens_requested']} shrunk to fit the bundle's context)")
    for r in result["prompts"]:
        ref = f", reference {r['agreement_reference']:.0%}" if "agreement_reference" in r else ""
        div = "" if r["first_divergence_host"] is None else f" (differs from token {r['first_divergence_host']})"
        out.print(f"  prompt {r['prompt']}: {len(r['device_tokens'])} tokens, host agreement "
                  f"{r['agreement_host']:.0%}{div}{ref}")
    s = result["speed"]
    if s:
        out.print(f"  load {s['load_s']:.2f} s, first token {s['ttft_ms']['median']:.1f} ms, prefill "
                  f"{s['prefill_tps']['median']:.1f} tok/s, decode {s['decode_tps']['median']:.1f} tok/s "
                  f"(median of {s['runs']}), peak RSS {s.get('peak_rss_mib')} MiB")
    for g in result["gates"]:
        mark = "[green]PASS[/green]" if g["ok"] else "[red]FAIL[/red]"
        out.print(f"  {mark} {g['name']}: {g['value']} {g['op']} {g['threshold']}")


def doctor(out: Console, report: dict) -> None:
    """`aot doctor`."""
    for key, value in report["versions"].items():
        out.print(f"{key:<12} {value}")
    host = report["host"]
    out.print(f"{'cpu':<12} {host['cpu']} ({host['cores']} cores, {host['arch']})")
    out.print(f"{'features':<12} {', '.join(host['cpu_features']) or '-'}")
    out.print(f"{'memory':<12} {host['memory_gib']} GiB")
    out.print("delegates:")
    for name, d in report["delegates"].items():
        mark = "[green]ok[/green]" if d["available"] else "[red]no[/red]"
        out.print(f"  {name:<10} {mark}  {d['reason']}")
    cache = report.get("hf_cache")
    if cache is None:
        return
    out.print(f"hf cache:    {cache['path']}")
    for c in cache["checkpoints"]:
        state = f"--model {c['model']}" if c["state"] == "complete" else f"incomplete, lacks {', '.join(c['missing'][:2])}"
        out.print(f"  {c['hf_repo']:<42} {c['revision'][:12]}  {state}")
    if not cache["checkpoints"]:
        out.print("  no published Llama 3.2 checkpoint (hf download meta-llama/Llama-3.2-1B-Instruct)")


def farm_packages(out: Console, result: dict) -> None:
    """`aot farm package`."""
    out.print(f"[bold]{result['out']}[/bold]")
    for p in result["packages"]:
        out.print(f"  {p['target']:<32} {p['archive']}  {p['test_spec']}  ({p['prompts']} prompts)")


def farm_table(result: dict) -> str:
    """`aot farm collect`: a device x target Markdown table."""
    lines = ["| device | target | agreement (min) | prefill tok/s | decode tok/s | gates |", "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        d, s = r["device"], r["speed"] or {}
        name = f"{d['model'] or d['serial']} ({d['serial']})"
        lowest = min((p["agreement_host"] for p in r["prompts"]), default=0)
        lines.append(f"| {name} | {r['target']} | {lowest:.0%} | {s.get('prefill_tps', '-')} | {s.get('decode_tps', '-')} "
                     f"| {'PASS' if r['ok'] else 'FAIL: ' + ', '.join(g['name'] for g in r['gates'] if not g['ok'])} |")
    return "\n".join(lines)


def farm_results(out: Console, result: dict) -> None:
    out.print(farm_table(result))


def serve_listening(out: Console, info: dict) -> None:
    """`aot serve`: the one line that says where it listens (scripts wait for it)."""
    key = ", API key required" if info["api_key"] else ""
    out.print(f"aot serve: {info['model']} at {info['url']}/v1 (context {info['max_context_len']}, max_tokens "
              f"<= {info['max_tokens']}, queue {info['queue']}{key}); Ctrl-C stops", markup=False)


def serve_stopped(err: Console, counts: dict) -> None:
    """`aot serve`, once stopped: what it answered."""
    err.print(f"[dim]aot serve: stopped; {counts['done']} generations, {counts['cancelled']} cancelled, "
              f"{counts['failed']} failed[/dim]")


def signed(out: Console, signature: str) -> None:
    """`aot release --sign`: where the signature went."""
    out.print(f"  signed: {escape(signature)}")


def published(out: Console, r: dict) -> None:
    """`aot publish`: the index written, what was uploaded and what the store had already."""
    out.print(f"[bold]{escape(r['index']['path'])}[/bold]  sha256 {r['index']['sha256'][:16]}"
              + ("  [green]signed[/green]" if r["signature"] else ""))
    for t in r["targets"]:
        out.print(f"  {escape(t['name']):<36} {t['files']} files, {t['uploaded']} new")
    out.print(f"  uploaded {r['uploaded']} blobs ({size(r['uploaded_bytes'])}), {r['skipped']} already there "
              f"({size(r['skipped_bytes'])}) in {r['seconds']:.1f} s")


def pulled(out: Console, r: dict) -> None:
    """`aot pull`: which target and why, where it lies, what came over the wire."""
    out.print(f"[bold]{escape(r['target'])}[/bold] from {escape(r['index'])}"
              + ("  [green]signature ok[/green]" if r["verified"] else "") + "  [green]sha256 ok[/green]")
    sel = r.get("selection")
    if sel:
        out.print(f"  chosen    {escape(sel['why'])}")
        for rej in sel["rejected"]:
            out.print(f"  not       {escape(rej['name'])}: {escape(rej['reason'])}")
    for f in r["files"]:
        how = "cached" if f["cached"] else (f"resumed at {size(f['resumed_at'])}" if f["resumed_at"] else "fetched")
        out.print(f"  {escape(f['name']):<16} {size(f['size']):>10}  {f['role']:<9} {how}")
    out.print(f"  fetched {size(r['fetched_bytes'])} of {size(r['bytes'])} in {r['seconds']:.1f} s; "
              f"snapshot {escape(r['snapshot'])}")
    if r["out"]:
        out.print(f"  bundle    {escape(r['out'])}")
