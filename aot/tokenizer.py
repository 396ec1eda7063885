"""The bundle's tokenizer: found beside the checkpoint or given, loaded exactly as ExecuTorch's
runners load it (pytorch-tokenizers' C++ classes), and the source of the bos/eos ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aot.chatformat import ChatFormat, find_chat_format
from aot.errors import CheckpointError, short
from aot.files import check_inside, is_int, read_json_object
from aot.native import native_output_silenced

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Llama 3 special tokens (tiktoken tokenizer.model): begin_of_text, end_of_text, eot_id.
LLAMA3_BOS, LLAMA3_EOS = 128_000, (128_001, 128_009)


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    kind: str  # "hf-json" | "tiktoken" | "sentencepiece"
    vocab_size: int
    bos_id: int
    eos_ids: tuple[int, ...]
    chat: ChatFormat | None = None  # the Instruct prompt format (bundle.json `chat`)
    chat_file: Path | None = None  # the tokenizer_config.json it came from (an input)


def find_tokenizer(checkpoint_dir: Path | None, given: Path | None) -> Path | None:
    if given is not None:
        given = Path(given).expanduser()
        if not given.is_file():
            raise CheckpointError(f"--tokenizer {given}: no such file; give tokenizer.json or tokenizer.model")
        return given
    if checkpoint_dir is None:
        return None
    for name in TOKENIZER_FILES:
        if (checkpoint_dir / name).is_file():
            check_inside(checkpoint_dir, [checkpoint_dir / name])
            return checkpoint_dir / name
    raise CheckpointError(
        f"--checkpoint {checkpoint_dir}: no tokenizer.json or tokenizer.model inside; pass --tokenizer FILE"
    )


MAX_TOKENIZER_BYTES = 64 << 20  # Llama 3's tokenizer.json is 8.7 MiB, its tokenizer.model 2.1 MiB


def load_tokenizer(path: Path):
    """(tokenizer, kind) using the classes ExecuTorch's C++ runner uses."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the tokenizer ({e.strerror})") from None
    if not path.is_file() or size > MAX_TOKENIZER_BYTES:
        raise CheckpointError(f"{path}: {'not a regular file' if not path.is_file() else f'{size >> 20} MiB'}; a "
                              f"tokenizer is a file of at most {MAX_TOKENIZER_BYTES >> 20} MiB (Llama 3's is 9 MiB)")
    with native_output_silenced():  # the C++ library logs to fd 2 when it loads
        from pytorch_tokenizers import CppHFTokenizer, CppSPTokenizer, CppTiktoken

    candidates = [("hf-json", CppHFTokenizer)] if path.suffix == ".json" else [
        ("tiktoken", CppTiktoken),
        ("sentencepiece", CppSPTokenizer),
    ]
    for kind, cls in candidates:
        try:
            with native_output_silenced():  # the C++ loaders log to fd 2 on every load
                tok = cls()
                tok.load(str(path))
        except RuntimeError:
            continue
        if tok.is_loaded():
            return tok, kind
    raise CheckpointError(
        f"{path}: not a tokenizer ExecuTorch's runner can load (tried {', '.join(k for k, _ in candidates)}); "
        "give a Hugging Face tokenizer.json or a Llama 3 tokenizer.model"
    )


def tokenizer_info(path: Path, checkpoint_dir: Path | None) -> TokenizerInfo:
    tok, kind = load_tokenizer(path)
    bos, eos = tok.bos_tok(), [tok.eos_tok()]
    chat = find_chat_format(tok, path, checkpoint_dir)
    gen = _generation_ids(checkpoint_dir) if checkpoint_dir is not None else {}
    bos = gen.get("bos", bos)
    if "eos" in gen:
        eos = gen["eos"]
    else:
        # No generation_config (Meta layout): Llama 3 instruct turns end with <|eot_id|>, and
        # with a chat format also <|eom_id|> (a turn that waits for a tool's result).
        for stop in ("<|eot_id|>", "<|eom_id|>") if chat is not None else ("<|eot_id|>",):
            ids = tok.encode(stop, 0, 0)
            if len(ids) == 1 and ids[0] not in eos:
                eos.append(ids[0])
    chat_file = _chat_file(chat, checkpoint_dir, path)
    return TokenizerInfo(path, kind, tok.vocab_size(), int(bos), tuple(int(e) for e in eos), chat, chat_file)


def _chat_file(chat: ChatFormat | None, checkpoint_dir: Path | None, path: Path) -> Path | None:
    if chat is None or chat.source != "tokenizer_config.json":
        return None
    for folder in (checkpoint_dir, path.parent):
        if folder is not None and (folder / "tokenizer_config.json").is_file():
            return folder / "tokenizer_config.json"
    return None


def _generation_ids(checkpoint_dir: Path) -> dict:
    """bos/eos from generation_config.json, else config.json (HF layout)."""
    out: dict = {}
    for name in ("config.json", "generation_config.json"):  # later files win
        file = checkpoint_dir / name
        if not file.is_file():
            continue
        cfg = read_json_object(file)
        bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
        if is_int(bos):
            out["bos"] = bos
        elif bos is not None and not (isinstance(bos, list) and not bos):
            raise CheckpointError(f"{file}: bos_token_id must be a token id (an int), but got {short(repr(bos), 60)}")
        if is_int(eos):
            out["eos"] = [eos]
        elif isinstance(eos, list) and eos and all(is_int(e) for e in eos):
            out["eos"] = list(eos)
        elif eos is not None and eos != []:
            raise CheckpointError(f"{file}: eos_token_id must be a token id or a list of them, but got "
                                  f"{short(repr(eos), 60)}")
    return out


