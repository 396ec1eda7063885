"""Tokenizers load with the runner's own classes; bos/eos come from the checkpoint's files."""

from __future__ import annotations

import base64
import json

import pytest

import checkpoints
from aot.errors import CheckpointError
from aot.tokenizer import find_tokenizer, tokenizer_info


def write_tiktoken(path, n_bytes=256):
    """A byte-level tiktoken tokenizer.model (Llama 3's format); the runner adds 256 special tokens."""
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(n_bytes)))
    return path


def test_tiktoken_model_gets_llama3_special_ids(tmp_path):
    info = tokenizer_info(write_tiktoken(tmp_path / "tokenizer.model"), checkpoint_dir=None)
    # <|begin_of_text|> is the first special token after the 256 byte tokens, <|eot_id|> the tenth,
    # <|eom_id|> the ninth (an eos too: the tokenizer has Llama 3's chat tokens, so a chat format).
    assert (info.kind, info.vocab_size, info.bos_id, info.eos_ids) == ("tiktoken", 512, 256, (257, 265, 264))
    assert info.chat is not None and info.chat.stop_ids == {"<|eot_id|>": 265, "<|eom_id|>": 264, "<|end_of_text|>": 257}


def test_generation_config_wins_over_the_tokenizer(tmp_path):
    checkpoints.write_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [2, 1]}))
    info = tokenizer_info(tmp_path / "tokenizer.json", checkpoint_dir=tmp_path)
    assert (info.kind, info.bos_id, info.eos_ids) == ("hf-json", 0, (2, 1))


def test_missing_and_unloadable_tokenizers(tmp_path):
    with pytest.raises(CheckpointError, match="pass --tokenizer"):
        find_tokenizer(tmp_path, None)
    with pytest.raises(CheckpointError, match="--tokenizer .*no such file"):
        find_tokenizer(None, tmp_path / "nope.json")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a tokenizer ExecuTorch's runner can load"):
        tokenizer_info(tmp_path / "tokenizer.json", None)
