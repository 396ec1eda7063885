"""Does SpinQuant help on the demo model? Held-out accuracy of 8da4w with and without rotations,
over several random-rotation seeds, plus the outlier statistics that explain the result.

    .venv/bin/python bench/spinquant_demo.py            # writes bench/results/spinquant_demo.json

Everything runs the eager torchao-quantized model (the exported .pte computes the same to 1e-3,
tests/test_quant.py and tests/test_spinquant.py), so the whole held-out text can be scored in
512-token windows, not only the first 512 tokens `aot validate` uses.

Variants: plain 8da4w; R1+R2 only (rotations fused into weights, no online transform); R4 only;
and full spinquant (R1+R2+R4), each rotation variant over --seeds random Hadamard draws.
Statistics on the fp32 model, before and after rotation: relative 4-bit g32 weight error
||W - Q(W)|| / ||W|| by layer kind, and activation peakiness (max |x| / rms per token, mean over
tokens) of the inputs of wq (the residual stream after RMSNorm) and of w2 (the FFN's inner product).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(scheme: str, seed: int, parts: str):
    from aot.config import DEMO_CHECKPOINT, BuildConfig
    from aot.pipeline import load_model, resolve_source
    from aot.quant import QuantConfig
    from aot.quant.rotation import Rotations, fuse_rotations, random_rotations

    cfg = BuildConfig(out=Path("unused"), checkpoint=DEMO_CHECKPOINT, quant=QuantConfig(scheme=scheme), seed=seed,
                      max_seq_len=512, max_context_len=512, full_logits=True)
    src = resolve_source(cfg, cfg.quant.plan())
    model = load_model(src, cfg)
    if parts:
        rot = random_rotations(model.args, seed)
        if "R1" not in parts:  # R4 only: identity R1/R2
            eye = torch.eye(model.args.dim, dtype=torch.float64)
            rot = Rotations(eye, [torch.eye(model.args.head_dim, dtype=torch.float64)] * model.args.n_layers, {})
        fuse_rotations(model, rot, online_r4="R4" in parts)
    return model


def windows(ids: list[int], n: int) -> list[list[int]]:
    return [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)]


@torch.no_grad()
def logits_of(model, chunks) -> list[torch.Tensor]:
    out = []
    for chunk in chunks:
        model.reset_cache()
        out.append(model(torch.tensor([chunk]), torch.tensor([0]))[0])
    return out


def metrics(ref: list[torch.Tensor], got: list[torch.Tensor], chunks) -> dict:
    nll_r = nll_g = kl = top1 = n = 0.0
    for r, g, c in zip(ref, got, chunks):
        t = torch.tensor(c[1:])
        lr, lg = torch.log_softmax(r[:-1], -1), torch.log_softmax(g[:-1], -1)
        nll_r += -lr.gather(1, t[:, None]).sum().item()
        nll_g += -lg.gather(1, t[:, None]).sum().item()
        kl += (lr.exp() * (lr - lg)).sum().item()
        top1 += (r[:-1].argmax(-1) == g[:-1].argmax(-1)).sum().item()
        n += t.numel()
    return {"ppl_ratio": math.exp((nll_g - nll_r) / n), "kl_mean": kl / n, "top1_agreement": top1 / n,
            "ppl": math.exp(nll_g / n), "positions": int(n)}


def weight_error(model) -> dict:
    from aot.quant import LayerQuant, _torchao_config
    from torchao.quantization import quantize_

    kinds = {"wq": [], "wk": [], "wv": [], "wo": [], "w1": [], "w3": [], "w2": []}
    for name, mod in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in kinds:
            w = mod.weight.detach().clone()
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w.clone()
            quantize_(lin, _torchao_config(LayerQuant(4, 32, "int8-dynamic")))
            dq = lin.weight.dequantize().float()
            kinds[kind].append(((w - dq).norm() / w.norm()).item())
    return {k: round(statistics.mean(v), 4) for k, v in kinds.items()}


@torch.no_grad()
def peakiness(model, chunks) -> dict:
    seen = {"wq_input": [], "w2_input": []}
    hooks = []
    for layer in model.layers:
        hooks.append(layer.attention.wq.register_forward_pre_hook(lambda m, a: seen["wq_input"].append(a[0])))
        hooks.append(layer.feed_forward.w2.register_forward_pre_hook(lambda m, a: seen["w2_input"].append(a[0])))
    logits_of(model, chunks)
    for h in hooks:
        h.remove()
    out = {}
    for key, xs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
        ratio = x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()
        out[key] = round(ratio.mean().item(), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/spinquant_demo.json")
    a = ap.parse_args()

    from tokenizers import Tokenizer

    from aot.config import DEMO_CHECKPOINT, DEMO_DIR
    from aot.native import native_output_silenced, quiet_libraries
    from aot.quant import apply_plan

    quiet_libraries(debug=False)
    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(DEMO_CHECKPOINT / "tokenizer.json"))
    ids = tok.encode((DEMO_DIR / "heldout.txt").read_text()).ids
    chunks = windows(ids, 512)
    start = time.perf_counter()
    with native_output_silenced():
        fp32 = load("none", 0, "")
        ref = logits_of(fp32, chunks)
        stats = {"fp32": {"weight_error_4bit_g32": weight_error(fp32), "peakiness": peakiness(fp32, chunks[:4])}}
        rotated = load("spinquant", 0, "R1R2R4")
        stats["rotated seed 0"] = {"weight_error_4bit_g32": weight_error(rotated),
                                   "peakiness": peakiness(rotated, chunks[:4])}
        del rotated
        results = {}
        variants = [("8da4w", "", [0])] + [
            (f"{parts}", parts, list(range(a.seeds))) for parts in ("R1R2", "R4", "R1R2R4")
        ]
        for label, parts, seeds in variants:
            runs = []
            for seed in seeds:
                model = load("spinquant" if parts else "8da4w", seed, parts)
                apply_plan(model, model_plan(parts))
                m = metrics(ref, logits_of(model, chunks), chunks)
                runs.append({"seed": seed, **{k: round(v, 5) for k, v in m.items()}})
                print(f"{label:8s} seed {seed}: ppl ratio {m['ppl_ratio']:.4f}  KL {m['kl_mean']:.5f}  "
                      f"top-1 {m['top1_agreement']:.2%}", flush=True)
            summary = {k: round(statistics.mean(r[k] for r in runs), 5) for k in ("ppl_ratio", "kl_mean", "top1_agreement")}
            if len(runs) > 1:
                summary["ppl_ratio_min"] = min(r["ppl_ratio"] for r in runs)
                summary["ppl_ratio_max"] = max(r["ppl_ratio"] for r in runs)
            results[label] = {"runs": runs, "mean": summary}
    out = {
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads()},
        "text": "aot/demo/heldout.txt", "positions": results["8da4w"]["runs"][0]["positions"],
        "windows": len(chunks), "results": results, "stats": stats,
        "seconds": round(time.perf_counter() - start, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    print("| variant | ppl ratio (mean, min..max over seeds) | KL | top-1 |\n|---|---|---|---|")
    for label, r in results.items():
        s = r["mean"]
        span = f" ({s['ppl_ratio_min']:.4f}..{s['ppl_ratio_max']:.4f})" if "ppl_ratio_min" in s else ""
        print(f"| {label} | {s['ppl_ratio']:.4f}{span} | {s['kl_mean']:.5f} | {s['top1_agreement']:.2%} |")
    print(f"wrote {a.out}")


def model_plan(parts: str):
    from aot.quant import QuantConfig

    return QuantConfig(scheme="spinquant" if parts else "8da4w").plan()


if __name__ == "__main__":
    main()
