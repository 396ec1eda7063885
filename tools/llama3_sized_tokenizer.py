"""Write a byte-level BPE tokenizer.json laid out exactly like Llama 3's: 128,000 BPE tokens (ids
0..127999: the 256 byte-level characters plus 127,744 merges) trained with the `tokenizers`
library, then Llama 3's 256 special tokens at 128000..128255, 128,256 ids in all. Meta's real
tokenizer cannot be downloaded here; this one has the same size and shape, so it stands in for it
wherever vocabulary size is what matters (grammar-constrained decoding's per-token mask cost,
bench/grammar_mask.py).

    .venv/bin/python tools/llama3_sized_tokenizer.py --out build/llama3-sized-tokenizer
    # about 2-3 minutes on 2 cores; --max-bytes sets the corpus cap

Pre-tokenizer: Llama 3's split pattern (tiktoken's cl100k pattern, as in Meta's tokenizer.json)
then ByteLevel; decoder ByteLevel; post-processor prepends <|begin_of_text|> when asked for a BOS,
as Meta's file does. Corpus: this Python's standard library (*.py, *.txt, *.rst, *.md, sorted by
path), then the venv's site-packages (*.py, *.txt, *.md, sorted by path), up to --max-bytes.
Training is deterministic for a given corpus (no sampling; the file order is fixed); the corpus
itself is whatever this machine has, so the output records its size, file count and SHA-256.
If the corpus cannot yield 128,000 tokens the cap is doubled and training rerun (up to all the
text there is); if even that falls short the script stops with an error saying how many it got,
rather than padding the vocabulary with tokens BPE never learned.

The written file is checked: `tokenizers.Tokenizer.from_file` loads it with 128,256 ids,
ExecuTorch's C++ tokenizer (`pytorch_tokenizers.CppHFTokenizer`) loads it with the same size, and
both encode "<|eot_id|>" to [128009] (and a sample text to the same ids).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

N_BPE = 128_000
# Llama 3's split pattern (identical to tiktoken's cl100k_base pattern).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_special_tokens() -> list[str]:
    """The 256 Llama 3 (3.1/3.2 text) special tokens, in id order from 128000."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(named))]


def corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    skip = {"site-packages", "__pycache__"}
    first = [p for p in sorted(stdlib.rglob("*")) if p.suffix in {".py", ".txt", ".rst", ".md"}
             and not skip & set(p.relative_to(stdlib).parts[:-1])]
    second = [p for p in sorted(site.rglob("*")) if p.suffix in {".py", ".txt", ".md"}
              and "__pycache__" not in p.parts]
    return first + second


def read_corpus(files: list[Path], max_bytes: int) -> tuple[list[str], int, str]:
    """(texts, bytes, sha256) of the files in order until max_bytes."""
    texts, total, digest = [], 0, hashlib.sha256()
    for path in files:
        if total >= max_bytes:
            break
        try:
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        data = text.encode("utf-8")
        texts.append(text)
        total += len(data)
        digest.update(data)
    return texts, total, digest.hexdigest()


def train(texts: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))  # Llama 3's tokenizer.json sets ignore_merges
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=N_BPE, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def finish(tok) -> dict:
    """The trained BPE plus Llama 3's special tokens and BOS post-processor, as tokenizer.json data."""
    data = json.loads(tok.to_str())
    specials = llama3_special_tokens()
    base = len(data["model"]["vocab"])
    assert base == N_BPE, base
    data["added_tokens"] = [{"id": base + i, "content": t, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, t in enumerate(specials)]
    bos = specials[0]
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [base], "tokens": [bos]}},
    }
    return data


def verify(path: Path) -> dict:
    from tokenizers import Tokenizer

    sample = 'def main():\n    print("Hello, wörld!")  # 12345 <|eot_id|>'
    hf = Tokenizer.from_file(str(path))
    assert hf.get_vocab_size(with_added_tokens=True) == N_BPE + 256, hf.get_vocab_size()
    assert hf.encode("<|eot_id|>", add_special_tokens=False).ids == [128009]
    assert hf.encode("x").ids[0] == 128000  # the BOS template
    assert hf.token_to_id("<|python_tag|>") == 128010 and hf.token_to_id("<|reserved_special_token_247|>") == 128255
    hf_ids = hf.encode(sample, add_special_tokens=False).ids
    assert hf.decode(hf_ids, skip_special_tokens=False) == sample

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from aot.native import native_output_silenced

    with native_output_silenced():
        from pytorch_tokenizers import CppHFTokenizer

        cpp = CppHFTokenizer()
        cpp.load(str(path))
    assert cpp.is_loaded() and cpp.vocab_size() == N_BPE + 256, cpp.vocab_size()
    eot = cpp.encode("<|eot_id|>", 0, 0)
    assert eot == [128009], eot
    cpp_ids = cpp.encode(sample, 0, 0)
    return {"vocab_size": hf.get_vocab_size(with_added_tokens=True), "eot_id": eot[0],
            "cpp_vocab_size": cpp.vocab_size(), "cpp_bos": cpp.bos_tok(), "cpp_eos": cpp.eos_tok(),
            "sample_ids_agree": cpp_ids == hf_ids, "sample_tokens": len(hf_ids)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for tokenizer.json (+ tokenizer_info.json)")
    ap.add_argument("--max-bytes", type=int, default=48_000_000, help="corpus cap in bytes (default 48 MB)")
    args = ap.parse_args()

    files = corpus_files()
    all_bytes = sum(p.stat().st_size for p in files if p.is_file())
    cap = args.max_bytes
    while True:
        texts, nbytes, sha = read_corpus(files, cap)
        start = time.perf_counter()
        tok = train(texts)
        seconds = time.perf_counter() - start
        trained = tok.get_vocab_size()
        print(f"trained {trained} BPE tokens from {len(texts)} files, {nbytes / 1e6:.1f} MB, in {seconds:.0f} s",
              flush=True)
        if trained >= N_BPE:
            break
        if cap >= all_bytes:
            sys.exit(f"error: all {nbytes / 1e6:.1f} MB of text yield only {trained} BPE tokens, not {N_BPE}")
        cap *= 2
        print(f"short of {N_BPE}: retraining on up to {cap / 1e6:.0f} MB", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "tokenizer.json"
    path.write_text(json.dumps(finish(tok), ensure_ascii=False))
    checks = verify(path)
    info = {"tokenizer": str(path), "bpe_tokens_trained": trained, "special_tokens": 256,
            "corpus_files": len(texts), "corpus_bytes": nbytes, "corpus_sha256": sha,
            "train_seconds": round(seconds, 1), "python": sys.version.split()[0],
            "tokenizers": __import__("tokenizers").__version__, "checks": checks,
            "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (args.out / "tokenizer_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
