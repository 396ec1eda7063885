"""`aot run`: the stock runner streams text, partial UTF-8 included; tampered bundles are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aot.bundle import open_bundle
from aot.runner.engines import PythonEngine, StockEngine
from aot.runner.text import TokenBytes, Utf8Stream
from conftest import run_cli

PROMPT = "naïve café — 日本語: "


def test_utf8_stream_holds_back_partial_characters():
    stream = Utf8Stream(byte_level=False)
    encoded = "é日".encode()
    assert [stream.feed(encoded[i : i + 1]) for i in range(len(encoded))] == ["", "é", "", "", "日"]
    byte_level = Utf8Stream(byte_level=True)
    assert byte_level.feed("Ã") == "" and byte_level.feed("©") == "é"  # GPT-2 alphabet for c3 a9


def test_stock_runner_streams_partial_utf8_like_the_reference_decoder(bundle_bytes):
    """Greedy generation with ExecuTorch's TextLLMRunner equals the Python loop's tokens decoded
    as whole bytes, and the run really produced tokens that are not valid UTF-8 on their own."""
    bundle = open_bundle(Path(bundle_bytes["path"]))
    python = PythonEngine(bundle)
    ids = python.encode(PROMPT)
    n = python.max_context_len - len(ids)  # as many as fit: the runner caps there too
    reference = python.generate(PROMPT, n)
    gen_ids = _greedy_ids(python, ids, n)
    pieces = [TokenBytes(bundle.tokenizer)([i]) for i in gen_ids]
    assert any(not _valid_utf8(p) for p in pieces), "the test needs a partial-UTF-8 token"
    expected = b"".join(pieces).decode("utf-8", errors="replace")
    assert reference.text == expected

    streamed = []
    stock = StockEngine(bundle).generate(PROMPT, n, on_text=streamed.append)
    assert stock.text == expected == "".join(streamed)
    assert stock.prompt_tokens == len(ids)  # the non-ASCII prompt tokenizes the same way
    assert any(ord(c) > 127 for c in stock.text)


def _greedy_ids(engine: PythonEngine, ids: list[int], n: int) -> list[int]:
    import torch

    logits, pos, out = engine._prefill(ids), len(ids), []
    for _ in range(n):
        token = int(logits.argmax())
        if token in engine.eos:
            break
        out.append(token)
        logits = engine._last(engine.forward(torch.tensor([[token]]), torch.tensor([pos])))
        pos += 1
    return out


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_aot_run_cli_streams_and_reports_speed(bundle_bytes):
    result = run_cli("run", bundle_bytes["path"], "--prompt", PROMPT, "--max-new-tokens", "12")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()
    assert "prefill" in result.stderr and "decode" in result.stderr and "tok/s" in result.stderr
    js = run_cli("run", bundle_bytes["path"], "--prompt", PROMPT, "--max-new-tokens", "12", "--json")
    payload = json.loads(js.stdout)
    assert payload["engine"] == "stock" and payload["generated_tokens"] >= 1
    assert payload["text"] + "\n" == result.stdout


def test_seed_needs_the_python_engine(bundle_bytes):
    result = run_cli("run", bundle_bytes["path"], "--prompt", "x", "--temperature", "0.8", "--seed", "3")
    assert result.exit_code == 3 and "--engine python" in result.stderr
    a = run_cli("run", bundle_bytes["path"], "--prompt", "x", "--temperature", "0.8", "--seed", "3",
                "--engine", "python", "--json")
    b = run_cli("run", bundle_bytes["path"], "--prompt", "x", "--temperature", "0.8", "--seed", "3",
                "--engine", "python", "--json")
    assert json.loads(a.stdout)["text"] == json.loads(b.stdout)["text"]


def test_tampered_bundle_is_refused(bundle_bytes, tmp_path):
    copy = Path(shutil.copytree(bundle_bytes["path"], tmp_path / "b"))
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace("Ġ", "G", 1))
    for cmd in (["run", copy, "--prompt", "x"], ["validate", copy], ["bench", copy]):
        result = run_cli(*cmd)
        assert result.exit_code == 7, (cmd, result.stderr)
        assert "tokenizer.json: sha256 does not match" in result.stderr


@pytest.mark.oracle
def test_tiktoken_converts_to_an_equivalent_byte_level_json(tmp_path):
    """For streaming, a Llama 3 tokenizer.model is handed to the stock runner as a byte-level
    tokenizer.json; read by the runner's own C++ class it must tokenize like the reference
    `tiktoken` library with the same ranks, pattern and special tokens."""
    import base64

    import tiktoken
    from pytorch_tokenizers import CppHFTokenizer
    from pytorch_tokenizers.constants import CL100K_PAT_STR, LLAMA_SPECIAL_TOKENS

    import checkpoints
    from aot.runner.text import byte_level_alphabet, stream_tokenizer

    hf = json.loads(checkpoints.write_tokenizer(tmp_path / "t.json", all_bytes=True).read_text())
    alphabet = byte_level_alphabet()
    tokens = sorted((i, t) for t, i in hf["model"]["vocab"].items() if i >= len(checkpoints.SPECIAL))
    ranks = {bytes(alphabet[c] for c in t): rank for rank, (_, t) in enumerate(tokens)}
    model = tmp_path / "tokenizer.model"
    model.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    converted, byte_level = stream_tokenizer(model, tmp_path)
    assert byte_level and converted.suffix == ".json"
    reference = tiktoken.Encoding("t", pat_str=CL100K_PAT_STR, mergeable_ranks=ranks,
                                  special_tokens={t: len(ranks) + i for i, t in enumerate(LLAMA_SPECIAL_TOKENS)})
    runner_side = CppHFTokenizer()
    runner_side.load(str(converted))
    samples = ["def load(fp, *, cls=None):\n    return json.loads(fp.read())\n", PROMPT,
               "  x  \n\n\ty = 'it''s' ok", "<|begin_of_text|>hello<|eot_id|>", "12345 678 ünïcödé ÉÀ 😀"]
    for text in samples:
        expected = reference.encode(text, allowed_special="all")
        assert runner_side.encode(text, 0, 0) == expected, text
        assert runner_side.encode(text, 1, 0) == [len(ranks)] + expected  # <|begin_of_text|>
