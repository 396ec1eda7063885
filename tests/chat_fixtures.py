"""Chat fixtures: a tokenizer with Llama 3's special-token ids (a small byte-level BPE whose vocab
is padded to 128,000 entries, then Llama 3's 256 special tokens at 128000-128255), Hugging Face
files that carry the Llama 3.2 chat template, and OpenAI-style tool schemas."""

from __future__ import annotations

import json
from pathlib import Path

from aot.chatformat import BUILTIN

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - len(LLAMA3_SPECIALS) + 3)]
CORPUS = [
    "Hello! How can I help you today? The weather in Paris is sunny and 18 degrees.",
    "Send a calendar invite to Alice for Monday at 10:00 about the design review.",
    '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are a helpful assistant.",
]


def llama3_tokenizer(folder: Path, chat_template: str | None = None) -> Path:
    """tokenizer.json (+ tokenizer_config.json with `chat_template` when given) in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), 128_000):  # never produced by a merge: pads the ids to Llama 3's layout
        vocab[f"<filler_{i}>"] = i
    data["added_tokens"] = [{"id": 128_000 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(LLAMA3_SPECIALS)]
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(data))
    if chat_template is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072}))
    return path


def llama32_template() -> str:
    return BUILTIN.read_text()


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "create_event", "description": "Put an event in the calendar and invite people.",
        "parameters": {"type": "object", "properties": {
            "title": {"type": "string"}, "day": {"type": "string"},
            "hour": {"type": "integer", "minimum": 0, "maximum": 23},
            "attendees": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "online": {"type": "boolean"}},
            "required": ["title", "day", "hour", "attendees"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "to": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["amount", "from", "to"]}}},
]


def write_chat_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama with Llama 3's vocabulary layout (128,256 ids), its chat template in
    tokenizer_config.json and Llama 3.2 Instruct's generation_config (eos: end_of_text, eom, eot)."""
    from checkpoints import write_hf_checkpoint

    write_hf_checkpoint(path, seed=seed, vocab_size=128_256, bos_token_id=128_000,
                        eos_token_id=[128_001, 128_008, 128_009])
    llama3_tokenizer(path, llama32_template())
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128_000, "eos_token_id": [128_001, 128_008, 128_009]}))
    return path
