"""Train aot's embedded demo model: a small Llama 3.2-architecture model (GQA, llama3 rope
scaling with factor 32, tied embeddings) trained from scratch on the Python standard library's
own source, which every machine has. Writes a Hugging Face folder (config.json, model.safetensors
in bf16 as Llama ships, tokenizer.json, generation_config.json), a held-out text sample for
`aot validate`, and a README recording how it was made.

    .venv/bin/python tools/train_demo.py --out aot/demo    # about 12 minutes on 2 cores

Needs the test extra (transformers) for training only; aot itself never imports transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import zlib
from pathlib import Path

import torch

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
BOS, EOS, EOT = 0, 1, 2
# Matches aot.families.text.model.MODELS["demo"]: 3.5 M parameters, 7 MB in bf16.
ARCH = dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2)
HELDOUT_EVERY = 20  # one file in 20, by a hash of its path, is held out
HELDOUT_SAMPLE_BYTES = 24_000


def corpus() -> tuple[list[tuple[str, str]], list[tuple[str, str]], Path]:
    """(train, heldout) lists of (relative path, text) from this Python's standard library."""
    root = Path(os.__file__).parent
    skip = {"site-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__", "lib2to3"}
    train, heldout = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if skip & set(rel.split("/")[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (heldout if zlib.crc32(rel.encode()) % HELDOUT_EVERY == 0 else train).append((rel, text))
    return train, heldout, root


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL[BOS]} $A",
                                                       special_tokens=[(SPECIAL[BOS], BOS)])
    return tok


def encode_stream(tok, docs: list[tuple[str, str]]) -> torch.Tensor:
    """Documents as <|begin_of_text|> text <|end_of_text|>, concatenated."""
    ids: list[int] = []
    for enc in tok.encode_batch([text for _, text in docs]):
        ids.extend(enc.ids)  # the post-processor adds <|begin_of_text|>
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
        x = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
        yield x[:, :-1], x[:, 1:]


@torch.no_grad()
def mean_loss(model, stream: torch.Tensor, seq: int, windows: int) -> float:
    """Mean next-token loss over `windows` evenly spaced windows of `seq` tokens."""
    step = max((len(stream) - seq - 1) // windows, 1)
    losses = []
    for i in range(windows):
        x = stream[i * step : i * step + seq + 1][None]
        losses.append(torch.nn.functional.cross_entropy(model(x[:, :-1]).logits[0], x[0, 1:]).item())
    return sum(losses) / len(losses)


def adamw_cosine(model, lr: float, steps: int, weight_decay: float, floor: float):
    """(optimizer, scheduler) both demo trainings use: AdamW (betas 0.9/0.95, weight decay on
    matrices only), linear warm-up over the first 5% of `steps`, then cosine decay to `floor` x lr."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=False)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, floor + (1 - floor) * 0.5 * (
        1 + math.cos(math.pi * min(max(s - warmup, 0) / max(steps - warmup, 1), 1.0)))))
    return opt, sched


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    train_docs, heldout_docs, root = corpus()
    tok = train_tokenizer([text for _, text in train_docs], ARCH["vocab_size"])
    train_ids, heldout_ids = encode_stream(tok, train_docs), encode_stream(tok, heldout_docs)
    print(f"corpus {root}: {len(train_docs)} train files ({len(train_ids):,} tokens), "
          f"{len(heldout_docs)} held-out files ({len(heldout_ids):,} tokens)", flush=True)

    config = LlamaConfig(
        **ARCH, rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=[EOS, EOT], initializer_range=0.02,
    )
    model = LlamaForCausalLM(config)
    opt, sched = adamw_cosine(model, args.lr, args.steps, weight_decay=0.1, floor=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    data = batches(train_ids, args.batch, args.seq, gen)
    train_t0, recent = time.time(), []
    model.train()
    for step in range(1, args.steps + 1):
        x, y = next(data)
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 100 == 0 or step == args.steps:
            rate = step * args.batch * args.seq / (time.time() - train_t0)
            print(f"step {step:5d}  train loss {sum(recent) / len(recent):.3f}  {rate:,.0f} tok/s", flush=True)
    train_seconds = time.time() - train_t0

    model.eval()
    train_loss = mean_loss(model, train_ids, args.seq, 64)
    heldout_loss = mean_loss(model, heldout_ids, args.seq, 64)
    model.to(torch.bfloat16)
    heldout_loss_bf16 = mean_loss(model.float(), heldout_ids, args.seq, 64)
    model.to(torch.bfloat16)

    out = args.out
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    GenerationConfig(bos_token_id=BOS, eos_token_id=[EOS, EOT]).save_pretrained(model_dir)
    tok.save(str(model_dir / "tokenizer.json"))
    sample, size = [], 0
    for _, text in heldout_docs:
        if size + len(text.encode()) > HELDOUT_SAMPLE_BYTES and sample:
            break
        sample.append(text)
        size += len(text.encode())
    (out / "heldout.txt").write_text("".join(sample))
    record = {
        "command": "python tools/train_demo.py " + " ".join(sys.argv[1:]),
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
        "tokens_seen": args.steps * args.batch * args.seq,
        "train_files": len(train_docs), "heldout_files": len(heldout_docs),
        "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids),
        "final_train_loss": round(train_loss, 4), "final_heldout_loss": round(heldout_loss, 4),
        "final_heldout_loss_bf16_weights": round(heldout_loss_bf16, 4),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t0, 1),
        "python": platform.python_version(), "torch": torch.__version__,
        "corpus": f"Python {platform.python_version()} standard library (*.py, tests/idlelib/lib2to3 excluded); "
                  f"every {HELDOUT_EVERY}th file by crc32 of its path held out",
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
