"""Token ids and pieces to text, correctly across multi-byte characters.

Byte-level BPE tokens can hold part of a UTF-8 character. ExecuTorch 1.5.1's Python token callback
converts each piece to `str` strictly, so a partial piece raises UnicodeDecodeError inside the C++
runner and aborts generation. aot hands the stock runner a copy of a byte-level tokenizer.json with
its decoder removed: pieces then arrive in the byte-level alphabet (always valid text), and
`Utf8Stream` maps them back to bytes and releases only whole characters.
"""

from __future__ import annotations

import base64
import codecs
import json
from functools import lru_cache
from pathlib import Path

from aot.errors import BundleError


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> the byte it encodes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Utf8Stream:
    """Feed pieces (byte-level alphabet text, or raw bytes); get back whole characters only."""

    def __init__(self, byte_level: bool):
        self.byte_level = byte_level
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: str | bytes) -> str:
        if isinstance(piece, str):
            piece = self.to_bytes(piece) if self.byte_level else piece.encode("utf-8")
        return self._decoder.decode(piece)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)

    @staticmethod
    def to_bytes(piece: str) -> bytes:
        table = byte_level_alphabet()
        # Special tokens (<|eot_id|>) are not in the alphabet: they pass through as their text.
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.encode("utf-8")


class TextSink:
    """Collects streamed pieces as whole characters, passing each new run of text to `on_text`."""

    def __init__(self, byte_level: bool, on_text=None):
        self.stream, self.on_text, self.parts = Utf8Stream(byte_level), on_text, []

    def feed(self, piece: str | bytes) -> None:
        self._emit(self.stream.feed(piece))

    def close(self) -> str:
        self._emit(self.stream.flush())
        return "".join(self.parts)

    def _emit(self, text: str) -> None:
        if text:
            self.parts.append(text)
            if self.on_text:
                self.on_text(text)


def is_byte_level(tokenizer_json: dict) -> bool:
    decoder = tokenizer_json.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


def stream_tokenizer(tokenizer: Path, workdir: Path) -> tuple[Path, bool]:
    """(tokenizer file to give the stock runner, whether its pieces are byte-level alphabet).

    A byte-level tokenizer.json loses its decoder; a Llama 3 tiktoken tokenizer.model becomes the
    equivalent byte-level tokenizer.json (same ids for every text), also without a decoder.
    """
    if tokenizer.suffix != ".json":
        data = tiktoken_as_tokenizer_json(tokenizer)
        if data is None:  # not tiktoken (sentencepiece): pieces are whole characters already
            return tokenizer, False
    else:
        try:
            data = json.loads(tokenizer.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BundleError(f"{tokenizer}: not readable JSON ({e})") from None
        if not is_byte_level(data):
            return tokenizer, False
    data["decoder"] = None
    out = workdir / "tokenizer.stream.json"
    out.write_text(json.dumps(data))
    return out, True


def _read_tiktoken(path: Path) -> dict[bytes, int] | None:
    ranks = {}
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, UnicodeDecodeError):
        return None
    return ranks


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Split `token` by applying only merges ranked below max_rank (tiktoken's BPE)."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def tiktoken_as_tokenizer_json(path: Path) -> dict | None:
    """A Llama 3 tiktoken file as a Hugging Face byte-level BPE tokenizer.json (None if not tiktoken).

    Ranks become ids, each multi-byte token's merge is recovered by BPE over lower ranks, the
    pre-tokenizer is the Llama 3 split pattern, and the 256 Llama 3 special tokens follow the
    ranks, as pytorch-tokenizers' Tiktoken lays them out. The result tokenizes like the reference
    `tiktoken` library (tested); pytorch-tokenizers' C++ Tiktoken differs from both on runs of
    spaces before a word (it does not honour the pattern's `\s+(?!\S)` lookahead).
    """
    from pytorch_tokenizers.constants import CL100K_PAT_STR, LLAMA_SPECIAL_TOKENS

    ranks = _read_tiktoken(path)
    if not ranks:
        return None
    char = {b: c for c, b in byte_level_alphabet().items()}

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        if len(token) > 1:
            left, right = _bpe_parts(ranks, token, rank)
            merges.append((rank, f"{text(left)} {text(right)}"))
    added = [{"id": len(ranks) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(LLAMA_SPECIAL_TOKENS)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CL100K_PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        # Like Meta's own Llama 3 tokenizer.json: asked for a BOS, prepend <|begin_of_text|>.
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": LLAMA_SPECIAL_TOKENS[0], "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {LLAMA_SPECIAL_TOKENS[0]: {"id": LLAMA_SPECIAL_TOKENS[0],
                                                                        "ids": [len(ranks)],
                                                                        "tokens": [LLAMA_SPECIAL_TOKENS[0]]}}},
        "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(t): r for t, r in ranks.items()}, "merges": [m for _, m in sorted(merges)]},
    }


class TokenBytes:
    """id -> bytes for a tokenizer file, to decode ids without the strict C++ -> str step."""

    def __init__(self, tokenizer: Path):
        self.table: dict[int, bytes] = {}
        if tokenizer.suffix == ".json":
            data = json.loads(tokenizer.read_text())
            alphabet = byte_level_alphabet() if is_byte_level(data) else None
            for token, i in (data.get("model", {}).get("vocab") or {}).items():
                self.table[i] = bytes(alphabet[c] for c in token) if alphabet and all(
                    c in alphabet for c in token) else token.encode("utf-8")
            for added in data.get("added_tokens", []):
                self.table[added["id"]] = added["content"].encode("utf-8")
        else:  # tiktoken: "<base64 bytes> <rank>" per line; special tokens follow the ranks
            from pytorch_tokenizers.constants import LLAMA_SPECIAL_TOKENS

            ranks = _read_tiktoken(tokenizer) or {}
            self.table = {rank: token for token, rank in ranks.items()}
            for i, special in enumerate(LLAMA_SPECIAL_TOKENS):
                self.table[len(ranks) + i] = special.encode()

    def __call__(self, ids) -> bytes:
        return b"".join(self.table.get(int(i), b"") for i in ids)
