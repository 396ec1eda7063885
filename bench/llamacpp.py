"""llama.cpp (Q4_0) on the same random weights as `aot build --random-weights`: prefill and decode
speed, and a check that the GGUF computes the same function as aot's model.

    .venv/bin/pip install llama-cpp-python==0.3.36 gguf    # benchmark-only tools, not aot dependencies
    .venv/bin/python bench/llamacpp.py --bandwidth          # 1B, seed 0 -> bench/results/llamacpp_1b.json/.md
    .venv/bin/python bench/llamacpp.py --bandwidth --bundle build/1b-random   # and an aot bundle alongside
    .venv/bin/python bench/llamacpp.py --model demo --repeats 1 --out /tmp/llamacpp_demo.json  # smoke test

(llama-cpp-python compiles llama.cpp from source on install: minutes; CMAKE_BUILD_PARALLEL_LEVEL=N
sets its parallelism. Build the matching bundle with
`.venv/bin/aot build --model 1b --random-weights --seed 0 --quant 8da4w --out build/1b-random`.)

The GGUF. Each weight is drawn exactly as `aot build --random-weights --seed S` draws it
(aot.families.text.model.random_init_: one generator per parameter, so they are drawn and written one at a time,
never the whole fp32 model at once) and written with gguf-py as arch "llama", the way
convert_hf_to_gguf.py writes a Llama 3.2 checkpoint: hyperparameters, the llama3 rope scaling as a
`rope_freqs` tensor of per-frequency divisors, tied embeddings as token_embd alone. First an F16
GGUF (F16 matrices, F32 norms), then Q4_0:
  --quantizer llama (default): llama.cpp's own quantizer on the F16 file (llama_model_quantize, what
    `llama-quantize model-f16.gguf Q4_0` runs): Q4_0 matrices, but token_embd Q6_K, because with
    tied embeddings it is also the output projection, which llama.cpp keeps at Q6_K. The file a
    llama.cpp user gets for "Q4_0" (the pipeline: convert_hf_to_gguf.py --outtype f16, llama-quantize).
  --quantizer gguf-py: Q4_0 for every matrix, token_embd included (gguf.quants.quantize), written
    directly.
q/k are written as aot holds them, unpermuted: aot's model uses Meta's interleaved rotary pairs
(aot/families/text/model.py apply_rope), which LLM_ARCH_LLAMA computes (rope type NORM); HF checkpoints are
half-split, and convert_hf_to_gguf.py permutes their q/k back to this layout. The tokenizer is
llama.cpp's "none" model with `llama.vocab_size` dummy tokens: token ids go in, no text. aot.* keys
record the model, layers and seed, which --gguf checks before reusing a file.

The check (skip with --no-check): aot's fp32 reference Transformer (built as aot.pipeline.load_model
builds it) and llama.cpp read the same random ids, --check-prompt tokens in one batch and then
--check-decode single tokens; for each of the check-decode + 1 last-token logit vectors, the cosine
similarity and whether the argmaxes agree. Twice:
  f16: the F16 GGUF, which must be the same function: cosine >= 0.9999 (measured 1 - cosine ~1e-6),
    else MISMATCH. This is the test of the layout: random weights attend weakly, so a wrong rotary
    layout moves the logits less than one might think, Q4_0 rounding more (q/k written in HF's
    half-split order: 1 - cosine 6.5e-4 on the demo, 0.29 at 1B widths with 2 layers).
  q4_0: the file measured. Q4_0 rounding of Gaussian weights costs accuracy, more at larger widths:
    cosine 0.98 (top-1 11/17) on the demo, 0.94 (5/17) at 1B widths with 2 layers. Informative,
    not a pass/fail; on a reused --gguf it is the only check.

The measurement follows bench/pte_speed.py: random token ids (the same ones), per round a fresh KV
cache, one prefill of --prompt tokens in one batch (n_batch = prompt), then --decode single-token
evals; median over --repeats rounds of prefill tok/s and decode tok/s, after one warm-up round that
is dropped. Timed around llama-cpp-python's Llama.eval, which decodes on --threads threads (default:
every core this process may use) and computes logits for the last token only, as aot's forward.
Each --bundle (an aot bundle directory or bare .pte) is measured the same way with pte_speed's own
code, after llama.cpp, subject by subject.

--bandwidth also measures the machine's read bandwidth (pte_speed.measure_bandwidth) and reports
each decode's fraction of the bandwidth bound, tok/s x bytes read per token / bandwidth. A GGUF
decode reads every tensor once per token except token_embd, of which it gathers one row; with tied
embeddings token_embd is also the output projection, read whole, so it counts. For bundles the
bytes are pte_speed's (model.pte bytes - embedding table bytes). The KV cache read is left out.

Writes --out (JSON, default bench/results/llamacpp_<model>.json) and the table next to it (.md).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

INSTALL = ".venv/bin/pip install llama-cpp-python==0.3.36 gguf"
LLAMA32_CONTEXT = 131072  # Llama 3.2's max_position_embeddings (GGUF llama.context_length)
START = time.perf_counter()


def step(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


def tools():
    """gguf and llama_cpp, or exit with how to install them (they are benchmark-only)."""
    try:
        import gguf
        import llama_cpp
    except ImportError as e:
        sys.exit(f"bench/llamacpp.py needs llama-cpp-python and gguf ({e.name} is missing): {INSTALL}")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's log, via its callback
    return gguf, llama_cpp


# ---- the weights ------------------------------------------------------------------------------


def model_args(name: str, layers: int | None):
    from aot.families.text.model import MODELS

    if name not in MODELS:
        sys.exit(f"unknown --model {name!r}; one of {', '.join(MODELS)}")
    args = MODELS[name]
    return dataclasses.replace(args, n_layers=layers) if layers else args


def tensor_plan(args) -> list[tuple[str, str]]:
    """(GGUF tensor name, aot parameter name), in writing order."""
    plan = [("token_embd.weight", "tok_embeddings.weight")]
    for i in range(args.n_layers):
        blk, p = f"blk.{i}.", f"layers.{i}."
        plan += [
            (blk + "attn_norm.weight", p + "attention_norm.weight"),
            (blk + "attn_q.weight", p + "attention.wq.weight"),  # Meta layout: no permutation
            (blk + "attn_k.weight", p + "attention.wk.weight"),
            (blk + "attn_v.weight", p + "attention.wv.weight"),
            (blk + "attn_output.weight", p + "attention.wo.weight"),
            (blk + "ffn_norm.weight", p + "ffn_norm.weight"),
            (blk + "ffn_gate.weight", p + "feed_forward.w1.weight"),
            (blk + "ffn_up.weight", p + "feed_forward.w3.weight"),
            (blk + "ffn_down.weight", p + "feed_forward.w2.weight"),
        ]
    plan.append(("output_norm.weight", "norm.weight"))
    if not args.tie_embeddings:
        plan.append(("output.weight", "output.weight"))
    return plan


class RandomWeights:
    """The weights `aot build --random-weights --seed S` draws, one parameter at a time: the model
    stays on the meta device and only the parameter asked for is materialised (random_init_ seeds
    each parameter's generator by its name, so this gives the build's values)."""

    def __init__(self, args, seed: int):
        from aot.families.text.model import Transformer

        with torch.device("meta"):
            self.model = Transformer(args, 1)
        self.seed = seed
        self.shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        if args.tie_embeddings:
            self.shapes["output.weight"] = self.shapes["tok_embeddings.weight"]

    def get(self, name: str) -> np.ndarray:
        from aot.families.common import random_init_

        module_name, _, pname = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        module.to_empty(device="cpu", recurse=False)
        random_init_(self.model, self.seed, {name})
        t = getattr(module, pname).detach()  # holds the storage after the module goes back to meta
        module.to("meta")
        return t.numpy()


def rope_factors(args) -> np.ndarray | None:
    """llama3 rope scaling as llama.cpp takes it: per-frequency divisors of the base frequencies
    (convert_hf_to_gguf.py's rope_freqs tensor), here from aot's own scaling."""
    from aot.families.common import llama3_scale as _llama3_scale

    if args.rope_scaling is None:
        return None
    d = args.head_dim
    base = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return (base / _llama3_scale(base, args.rope_scaling)).float().numpy()


def write_gguf(path: Path, model: str, args, seed: int, quantizer: str) -> None:
    """The GGUF at `path`: F16 matrices (quantizer "llama", to quantize next) or Q4_0 ("gguf-py")."""
    gguf, _ = tools()
    Q4_0 = gguf.GGMLQuantizationType.Q4_0
    direct = quantizer == "gguf-py"
    if direct and (args.dim % 32 or args.ffn_hidden % 32):
        sys.exit(f"Q4_0 needs rows in blocks of 32: dim {args.dim}, ffn_hidden {args.ffn_hidden}")
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("model")
    w.add_name(f"aot random {model} seed {seed}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if direct else gguf.LlamaFileType.MOSTLY_F16)
    if direct:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(args.vocab_size)
    w.add_context_length(LLAMA32_CONTEXT)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_tokenizer_model("none")  # llama.vocab_size dummy tokens; ids in, no text
    # Which weights these are, checked when --gguf reuses the file.
    w.add_string("aot.families.text.model", model)
    w.add_uint32("aot.n_layers", args.n_layers)
    w.add_int64("aot.seed", seed)
    w.add_string("aot.quantizer", quantizer)

    weights = RandomWeights(args, seed)
    plan = tensor_plan(args)
    rope = rope_factors(args)
    if rope is not None:
        w.add_tensor_info("rope_freqs.weight", rope.shape, np.float32, rope.nbytes)
    for gname, pname in plan:
        shape = weights.shapes[pname]
        n = int(np.prod(shape))
        if len(shape) == 1:
            w.add_tensor_info(gname, shape, np.float32, n * 4)
        elif not direct:
            w.add_tensor_info(gname, shape, np.float16, n * 2)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, Q4_0)
            w.add_tensor_info(gname, byte_shape, np.uint8, int(np.prod(byte_shape)), raw_dtype=Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    if rope is not None:
        w.write_tensor_data(rope)
    for gname, pname in plan:
        a = weights.get(pname)
        if a.ndim == 1:
            w.write_tensor_data(a.astype(np.float32))
        elif not direct:
            w.write_tensor_data(a.astype(np.float16))
        else:
            rows = max(1, (64 << 20) // (a.shape[1] * 4))  # quantize ~64 MiB of fp32 at a time
            w.write_tensor_data(np.concatenate([gguf.quantize(a[i : i + rows], Q4_0) for i in range(0, len(a), rows)]))
        del a
        if gname.endswith("ffn_down.weight") or gname == "token_embd.weight":
            step(f"  wrote {gname.split('.ffn')[0]} ({len(plan)} tensors in all)")
    w.close()


def quantize_q4_0(src: Path, dst: Path, threads: int) -> None:
    """llama.cpp's own Q4_0 quantization (llama_model_quantize: what `llama-quantize src dst Q4_0` runs)."""
    _, llama_cpp = tools()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama_model_quantize {src} failed")


def gguf_info(path: Path) -> dict:
    """What the file says it holds: aot's provenance keys, tensor types and byte counts."""
    gguf, _ = tools()
    r = gguf.GGUFReader(path)

    def field(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    tensor_bytes = {t.name: int(t.n_bytes) for t in r.tensors}
    tied = "output.weight" not in tensor_bytes
    embd = r.tensors[[t.name for t in r.tensors].index("token_embd.weight")]
    return {
        "model": field("aot.families.text.model"),
        "n_layers": field("aot.n_layers"),
        "seed": field("aot.seed"),
        "quantizer": field("aot.quantizer"),
        "tensor_types": types,
        "token_embd_type": embd.tensor_type.name,
        "tensor_bytes": sum(tensor_bytes.values()),
        # decode gathers one token_embd row, unless token_embd is also the output projection
        "bytes_read_per_token": sum(tensor_bytes.values()) - (0 if tied else tensor_bytes["token_embd.weight"]),
    }


# ---- llama.cpp --------------------------------------------------------------------------------


class LlamaCpp:
    """One GGUF loaded once; `once()` is one measured prefill + decode on an emptied KV cache."""

    def __init__(self, path: Path, prompt: int, decode: int, threads: int, flash_attn: bool, n_ctx: int, n_batch: int):
        _, llama_cpp = tools()
        self.lib, self.path, self.prompt, self.decode = llama_cpp, path, prompt, decode
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
            n_threads_batch=threads, flash_attn=flash_attn, verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        g = torch.Generator().manual_seed(0)  # pte_speed's ids
        self.ids = torch.randint(0, self.n_vocab, (1, prompt + decode), generator=g)[0].tolist()
        self.prefill, self.dec = [], []

    def _fresh(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    def _eval(self, tokens: list[int]) -> None:
        self.llm.eval(tokens)
        self.lib.llama_synchronize(self.llm._ctx.ctx)

    def last_logits(self) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def once(self) -> None:
        self._fresh()
        start = time.perf_counter()
        self._eval(self.ids[: self.prompt])
        mid = time.perf_counter()
        for t in self.ids[self.prompt :]:
            self._eval([t])
        end = time.perf_counter()
        self.prefill.append(self.prompt / (mid - start))
        self.dec.append(self.decode / (end - mid))

    def logits_for(self, ids: list[int], n_prompt: int) -> np.ndarray:
        """Last-token logits after a prefill of ids[:n_prompt], then after each later id alone."""
        self._fresh()
        self._eval(ids[:n_prompt])
        rows = [self.last_logits()]
        for t in ids[n_prompt:]:
            self._eval([t])
            rows.append(self.last_logits())
        return np.stack(rows)


def reference_logits(args, seed: int, ids: list[int], n_prompt: int) -> np.ndarray:
    """aot's fp32 Transformer on the build's random weights (as pipeline.load_model makes it):
    logits at positions n_prompt - 1 ... len(ids) - 1."""
    from aot.families.common import random_init_
    from aot.families.text.model import Transformer

    with torch.device("meta"):
        model = Transformer(args, len(ids), full_logits=True)
    model.to_empty(device="cpu")
    model.init_buffers()
    random_init_(model, seed)
    with torch.no_grad():
        out = model.eval()(torch.tensor([ids]), torch.tensor([0]))[0]
    return out[n_prompt - 1 :].float().numpy()


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    top1 = ours.argmax(-1) == ref.argmax(-1)
    top5 = [len(set(np.argsort(-o)[:5]) & set(np.argsort(-r)[:5])) for o, r in zip(ours, ref)]
    return {
        "positions": len(ref),
        "cosine_mean": round(float(cos.mean()), 6),
        "cosine_min": round(float(cos.min()), 6),
        "one_minus_cosine": float(f"{1 - cos.mean():.3g}"),
        "cosine_all": [round(float(c), 6) for c in cos],
        "top1_agree": int(top1.sum()),
        "top5_overlap_mean": round(float(np.mean(top5)), 2),
    }


# ---- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b", help="aot.families.text.model.MODELS name [1b].")
    ap.add_argument("--layers", type=int, help="Override n_layers (e.g. 2: 1B widths, a quick test).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of --random-weights [0].")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama.cpp threads [all cores].")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (llama-cpp-python's default: off).")
    ap.add_argument("--quantizer", choices=("llama", "gguf-py"), default="llama",
                    help="llama: F16 GGUF + llama.cpp's llama_model_quantize Q4_0 (token_embd Q6_K); "
                         "gguf-py: Q4_0 everywhere, written directly [llama].")
    ap.add_argument("--gguf", type=Path, help="GGUF to use if it exists (its aot.* keys must match), else to write and keep.")
    ap.add_argument("--keep", action="store_true", help="Keep the written GGUF (under build/gguf/ unless --gguf).")
    ap.add_argument("--bundle", type=Path, action="append", default=[], help="Also measure an aot bundle (or .pte); repeatable.")
    ap.add_argument("--bare-embedding-bytes", type=int, help="Embedding table bytes of bare .pte --bundle files.")
    ap.add_argument("--no-check", action="store_true", help="Skip the logits check against aot's fp32 model.")
    ap.add_argument("--check-prompt", type=int, default=16)
    ap.add_argument("--check-decode", type=int, default=16)
    ap.add_argument("--bandwidth", action="store_true", help="Also measure read bandwidth and the decode roofline.")
    ap.add_argument("--out", type=Path, help="JSON to write [bench/results/llamacpp_<model>.json].")
    a = ap.parse_args()
    from aot.native import quiet_libraries

    quiet_libraries(debug=False)  # torchao's and ExecuTorch's import-time chatter
    gguf, llama_cpp = tools()
    args = model_args(a.model, a.layers)
    tag = a.model + (f"-{a.layers}l" if a.layers else "")
    out = a.out or ROOT / f"bench/results/llamacpp_{tag.replace('-', '_')}.json"
    step(f"llama-cpp-python {llama_cpp.__version__}, gguf-py; model {tag} ({args.num_params() / 1e6:,.1f} M params), "
         f"seed {a.seed}, {a.threads} threads")

    reuse = a.gguf is not None and a.gguf.exists()
    if reuse:  # before anything slow: the file must hold these weights
        path = a.gguf
        info = gguf_info(path)
        want = {"model": a.model, "n_layers": args.n_layers, "seed": a.seed}
        got = {k: info[k] for k in want}
        if got != want:
            sys.exit(f"{path} holds {got}, not {want}: pick another --gguf or change the options")

    ref, check = None, None
    n_check = a.check_prompt + a.check_decode
    if not a.no_check:
        from aot.native import native_output_silenced

        g = torch.Generator().manual_seed(1)
        check_ids = torch.randint(0, args.vocab_size, (n_check,), generator=g).tolist()
        step(f"check: aot's fp32 reference forward ({a.check_prompt} + {a.check_decode} tokens)")
        with native_output_silenced():  # ExecuTorch's custom ops log from C++
            ref = reference_logits(args, a.seed, check_ids, a.check_prompt)
        gc.collect()
        check = {"prompt": a.check_prompt, "decode": a.check_decode, "ids_seed": 1, "same_function": None}

    def run_check(kind: str, file: Path) -> None:
        sub = LlamaCpp(file, a.check_prompt, a.check_decode, a.threads, a.flash_attn, n_check, a.check_prompt)
        c = check[kind] = compare(sub.logits_for(check_ids, a.check_prompt), ref)
        sub.llm.close()
        if kind == "f16":  # unquantized: the same function up to f16 weight rounding
            c["ok"] = check["same_function"] = c["cosine_min"] > 0.9999
            verdict = "same function" if c["ok"] else "MISMATCH: not the same function (rope layout? weights?)"
        else:
            verdict = "Q4_0 rounding" + ("" if "f16" in check else "; the F16 check, without --gguf, tests the layout")
        step(f"check {kind}: logit cosine mean {c['cosine_mean']} (min {c['cosine_min']}, 1 - mean {c['one_minus_cosine']:.2e}), "
             f"top-1 agrees {c['top1_agree']}/{c['positions']}, top-5 overlap {c['top5_overlap_mean']}/5: {verdict}")

    tmp, times = None, {}
    if reuse:
        step(f"reusing {path}")
    else:
        if a.gguf is not None:
            path = a.gguf
        elif a.keep:
            path = ROOT / f"build/gguf/random-{tag}-seed{a.seed}-q4_0{'-pure' if a.quantizer == 'gguf-py' else ''}.gguf"
        else:
            tmp = tempfile.TemporaryDirectory(prefix="aot-llamacpp-")
            path = Path(tmp.name) / f"random-{tag}-seed{a.seed}-q4_0.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        f16 = path.with_name(path.stem + ".f16.gguf")
        if a.quantizer == "llama" or ref is not None:  # the F16 GGUF: llama-quantize's input, and the exact check
            step(f"writing {f16} (F16 matrices)")
            t0 = time.perf_counter()
            write_gguf(f16, a.model, args, a.seed, "llama")
            times["f16_write_s"] = round(time.perf_counter() - t0, 1)
            step(f"wrote {f16.name}: {f16.stat().st_size / 2**20:,.1f} MiB in {times['f16_write_s']} s")
            if ref is not None:
                run_check("f16", f16)
        t0 = time.perf_counter()
        if a.quantizer == "llama":
            step(f"llama_model_quantize Q4_0 ({a.threads} threads) -> {path}")
            quantize_q4_0(f16, path, a.threads)
        else:
            step(f"writing {path} (Q4_0 with gguf-py)")
            write_gguf(path, a.model, args, a.seed, "gguf-py")
        times["q4_0_s"] = round(time.perf_counter() - t0, 1)
        f16.unlink(missing_ok=True)
        info = gguf_info(path)
        step(f"wrote {path.name}: {path.stat().st_size / 2**20:,.1f} MiB in {times['q4_0_s']} s; tensors {info['tensor_types']}")
    if ref is not None:
        run_check("q4_0", path)
        del ref
        gc.collect()

    step("loading the GGUF in llama.cpp")
    sub = LlamaCpp(path, a.prompt, a.decode, a.threads, a.flash_attn, a.prompt + a.decode, a.prompt)
    step(f"llama.cpp: {a.repeats} rounds + 1 warm-up of prefill {a.prompt} + decode {a.decode}")
    for _ in range(a.repeats + 1):
        sub.once()
    prefill, dec = sub.prefill[1:], sub.dec[1:]  # the first round warms caches
    file_bytes = path.stat().st_size
    results = [{
        "engine": "llama.cpp",
        "name": f"{path.name} ({info['quantizer'] or a.quantizer})",
        "gguf": str(path) + (" (temporary, deleted)" if tmp is not None else ""),
        "quant": f"Q4_0 (token_embd {info['token_embd_type']})",
        "tensor_types": info["tensor_types"],
        "gguf_bytes": file_bytes,
        "file_mib": round(file_bytes / 2**20, 1),
        "prefill_tps": round(statistics.median(prefill), 1),
        "decode_tps": round(statistics.median(dec), 2),
        "prefill_all": [round(x, 1) for x in prefill],
        "decode_all": [round(x, 2) for x in dec],
        "bytes_read_per_token": info["bytes_read_per_token"],
    }]
    step(f"llama.cpp: prefill {results[0]['prefill_tps']} tok/s, decode {results[0]['decode_tps']} tok/s")
    sub.llm.close()
    del sub
    gc.collect()

    if a.bundle:
        from aot.native import native_output_silenced
        from pte_speed import Subject

        for b in a.bundle:
            step(f"aot: {b}")
            with native_output_silenced():
                s = Subject(b, a.prompt, a.decode)
                for _ in range(a.repeats + 1):
                    s.once()
            r = s.result()
            emb = s.embedding_bytes(a.bare_embedding_bytes)
            r.update(engine="aot (ExecuTorch)", name=f"{b} ({r['quant']})", file_mib=r["pte_mib"], embedding_bytes=emb,
                     bytes_read_per_token=None if emb is None else r["pte_bytes"] - emb)
            if b.suffix != ".pte":
                m = json.loads((b / "bundle.json").read_text())["model"]
                same = m["random_weights"] and m["seed"] == a.seed and m["args"] == args.to_dict()
                r["same_weights"] = bool(same)
                if not same:
                    step(f"  note: {b} is not {tag} with --random-weights --seed {a.seed}; speeds only")
            results.append(r)
            step(f"aot: prefill {r['prefill_tps']} tok/s, decode {r['decode_tps']} tok/s")

    report = {
        "machine": {"platform": platform.platform(), "threads": a.threads, "torch_threads": torch.get_num_threads()},
        "model": {"name": a.model, "args": args.to_dict(), "random_weights": True, "seed": a.seed},
        "llama_cpp": {
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "quantizer": info["quantizer"] or a.quantizer,
            "flash_attn": a.flash_attn, "n_ctx": a.prompt + a.decode, "n_batch": a.prompt, "n_threads": a.threads,
            **times,
        },
        "prompt": a.prompt, "decode": a.decode, "repeats": a.repeats,
        "check": check,
        "results": results,
    }
    if a.bandwidth:
        from pte_speed import measure_bandwidth

        bw = measure_bandwidth()
        report["read_bandwidth_gb_s"] = round(bw / 1e9, 2)
        for r in results:
            read = r["bytes_read_per_token"]
            if read is None:
                continue
            r["bandwidth_bound_tps"] = round(bw / read, 2)
            r["fraction_of_bound"] = round(r["decode_tps"] * read / bw, 3)
        step(f"read bandwidth {bw / 1e9:.2f} GB/s")

    lines = ["| engine | file | MiB | prefill tok/s | decode tok/s | decode bound tok/s | fraction |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['engine']} | {r['name']} | {r['file_mib']:,.0f} | {r['prefill_tps']} | {r['decode_tps']} | "
                     f"{r.get('bandwidth_bound_tps', '-')} | {r.get('fraction_of_bound', '-')} |")
    for kind in ("f16", "q4_0"):
        if check is not None and kind in check:
            c = check[kind]
            lines.append(f"\nllama.cpp {kind.upper()} GGUF vs aot's fp32 model ({tag}, seed {a.seed}, {c['positions']} "
                         f"positions): logit cosine mean {c['cosine_mean']} (min {c['cosine_min']}), top-1 agrees "
                         f"{c['top1_agree']}/{c['positions']}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if tmp is not None:
        tmp.cleanup()
    elif times:
        print(f"kept {path}")
    if check is not None and check["same_function"] is False:
        sys.exit("MISMATCH: the F16 GGUF does not compute aot's function; the speeds above are not comparable")


if __name__ == "__main__":
    main()
