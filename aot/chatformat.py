"""The prompt format an Instruct model was trained on, carried in the bundle so every app formats
exactly as aot does: the checkpoint's own Jinja `chat_template` (Hugging Face tokenizer_config.json),
or for a Meta-layout checkpoint Llama 3.2's documented format (aot/chat_templates/llama3.2.jinja,
the template Meta's Hugging Face repos carry); the tokens that end a turn; how tools are called.

Rendering is transformers' `apply_chat_template`: the same sandboxed Jinja environment (trim_blocks,
lstrip_blocks, loopcontrols, its `tojson`, `raise_exception`, `strftime_now`) and the same inputs
(messages with None-valued keys dropped, tools, the special tokens by name). Tokenizing a rendered
chat parses the special tokens the *template* wrote and encodes any that arrive inside a message,
a tool schema or a tool result as plain text, so a user cannot forge a turn (transformers'
`sanitize_control_tokens`).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from aot.errors import CheckpointError, ConfigError
from aot.files import read_json_object

BUILTIN = Path(__file__).parent / "chat_templates" / "llama3.2.jinja"
# Llama 3's chat tokens: the header markers, the two turn ends (eom: the turn waits for a tool
# result), end of text and python_tag (built-in tool calls).
HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>")
STOP_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
LLAMA3_CONTROL = ("<|begin_of_text|>", *HEADER_TOKENS, *STOP_TOKENS, "<|python_tag|>", "<|finetune_right_pad_id|>")
ROLES = ("system", "user", "assistant", "tool", "ipython")


@dataclass(frozen=True)
class ChatFormat:
    template: str  # Jinja source
    source: str  # where it came from: "tokenizer_config.json" or "llama3.2 (Meta's documented format)"
    special_tokens: dict  # name -> text, as transformers passes them to the template (bos_token, eos_token)
    stop_ids: dict  # turn-ending token text -> id (every one the tokenizer has)
    control_tokens: tuple[str, ...]  # special-token texts parsed in the template's output only
    tool_format: str | None  # "llama3.2-json": a call is {"name": ..., "parameters": {...}}; None: no tools

    def record(self) -> dict:
        """bundle.json's `chat`."""
        return {
            "template": self.template,
            "template_sha256": hashlib.sha256(self.template.encode()).hexdigest(),
            "source": self.source,
            "special_tokens": self.special_tokens,
            "stop_ids": self.stop_ids,
            "control_tokens": list(self.control_tokens),
            "tool_calls": None if self.tool_format is None else {
                "format": self.tool_format,
                "call": '{"name": NAME, "parameters": {ARGUMENTS}} as the whole assistant turn, then <|eot_id|>',
                "result_role": "ipython",
            },
        }

    @classmethod
    def from_record(cls, rec: dict) -> ChatFormat:
        tools = rec.get("tool_calls")
        return cls(rec["template"], rec["source"], dict(rec["special_tokens"]), dict(rec["stop_ids"]),
                   tuple(rec["control_tokens"]), tools["format"] if tools else None)

    # ---- render ---------------------------------------------------------------------------

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **kwargs) -> str:
        """The prompt text, exactly as transformers' apply_chat_template(..., tokenize=False)."""
        return _render(self.template, normalize_messages(messages), tools, add_generation_prompt,
                       {**self.special_tokens, **kwargs})

    def encode(self, tokenizer, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of the rendered chat (BOS included, as the template writes it). Control tokens
        in the caller's strings are encoded as text, never as the tokens themselves."""
        nonce = secrets.token_hex(4)
        marks = {f"\ue000{nonce}{i}\ue001": t for i, t in enumerate(self.control_tokens)}
        by_token = {t: m for m, t in marks.items()}
        pattern = re.compile("|".join(re.escape(t) for t in sorted(self.control_tokens, key=len, reverse=True)))

        def mark(value):
            if isinstance(value, str):
                return pattern.sub(lambda m: by_token[m.group(0)], value) if self.control_tokens else value
            if isinstance(value, dict):
                return {mark(k): mark(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [mark(v) for v in value]
            return value

        text = _render(self.template, normalize_messages(mark(messages)), mark(tools), add_generation_prompt,
                       {**self.special_tokens, **mark(kwargs)})
        ids: list[int] = []
        for part in re.split("(\ue000" + nonce + r"\d+\ue001)", text):
            if part in marks:  # a control token the caller wrote: its text, split so it cannot match
                token = marks[part]
                ids += list(tokenizer.encode(token[:1], 0, 0)) + list(tokenizer.encode(token[1:], 0, 0))
            elif part:
                ids += list(tokenizer.encode(part, 0, 0))
        return ids


def normalize_messages(messages: list[dict]) -> list[dict]:
    """transformers' normalization (keys whose value is None dropped), and OpenAI-style tool calls
    whose `arguments` is a JSON string decoded to the object chat templates expect."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn = {**fn, "arguments": json.loads(fn["arguments"])}
                    except json.JSONDecodeError:
                        raise ConfigError(f"tool call {fn.get('name')!r}: arguments are not JSON") from None
                    c = {**c, "function": fn}
                fixed.append(c)
            m["tool_calls"] = fixed
        out.append(m)
    return out


def check_messages(messages, where: str) -> list[dict]:
    """An OpenAI-style message list, checked: one line naming `where` for anything wrong."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: expected a non-empty JSON list of messages ({{\"role\": ..., \"content\": ...}})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ConfigError(f"{where}: message {i} needs a role, one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, dict, list)):
            raise ConfigError(f"{where}: message {i}: content must be a string")
        if content is None and not m.get("tool_calls"):
            raise ConfigError(f"{where}: message {i} ({m['role']}) has no content")
    return messages


# ---- the Jinja environment (transformers' own) -------------------------------------------


def _render(template: str, messages: list[dict], tools, add_generation_prompt: bool, kwargs: dict) -> str:
    import jinja2

    try:
        return _compile(template).render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        raise ConfigError(f"the bundle's chat template refused these messages: {e}") from None


@lru_cache(maxsize=4)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"chat_template: not a valid Jinja template ({e})") from None


# ---- from a checkpoint --------------------------------------------------------------------


def find_chat_format(tokenizer, tokenizer_path: Path, checkpoint_dir: Path | None) -> ChatFormat | None:
    """The chat format of a checkpoint: tokenizer_config.json's chat_template (in the checkpoint, or
    beside --tokenizer), else Llama 3.2's documented format when the tokenizer has Llama 3's header
    tokens (a Meta-layout Instruct checkpoint), else None (a base model without a format)."""
    single = {t: ids[0] for t in (*LLAMA3_CONTROL,) if len(ids := list(tokenizer.encode(t, 0, 0))) == 1}
    config = _tokenizer_config(checkpoint_dir, tokenizer_path)
    template = _template_of(config) if config else None
    if template is not None:
        source = "tokenizer_config.json"
        names = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        special = {k: v for k, v in names.items() if v is not None}
    elif all(t in single for t in (*HEADER_TOKENS, "<|eot_id|>")):
        template, source = BUILTIN.read_text(), "llama3.2 (Meta's documented format)"
        special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    else:
        return None
    control = tuple(single)  # every Llama 3 special the tokenizer has, as transformers sanitizes them
    stops = {t: single[t] for t in STOP_TOKENS if t in single}
    tool_format = "llama3.2-json" if "tools" in template and '"parameters"' in template else None
    return ChatFormat(template, source, special, stops, control, tool_format)


def _tokenizer_config(checkpoint_dir: Path | None, tokenizer_path: Path) -> dict | None:
    for folder in dict.fromkeys(d for d in (checkpoint_dir, tokenizer_path.parent) if d is not None):
        file = folder / "tokenizer_config.json"
        if file.is_file():
            data = read_json_object(file)
            if data.get("chat_template") is None and (folder / "chat_template.jinja").is_file():
                data["chat_template"] = (folder / "chat_template.jinja").read_text()  # transformers 5 writes it apart
            return data
    return None


def _template_of(config: dict) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} (the
    "default" one; a separate "tool_use" one wins, since aot renders tools)."""
    t = config.get("chat_template")
    if isinstance(t, list):
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        t = named.get("tool_use") or named.get("default")
    if t is None:
        return None
    if not isinstance(t, str) or not t.strip():
        raise CheckpointError("tokenizer_config.json: chat_template must be a Jinja template string")
    _compile(t)
    return t


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # an AddedToken record
        return value["content"]
    return None


# ---- tools (OpenAI-style function schemas) --------------------------------------------------

TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
TOOL_CHOICES = ("auto", "none", "required")


def check_tools(tools, where: str) -> list[dict]:
    """OpenAI-style tools ([{"type": "function", "function": {name, description, parameters}}], or
    the bare function objects), checked and in the OpenAI form; one line naming `where` if wrong."""
    if not isinstance(tools, list) or not tools:
        raise ConfigError(f"{where}: expected a non-empty JSON list of tools "
                          '([{"type": "function", "function": {"name": ..., "parameters": {...}}}])')
    out, names = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not TOOL_NAME.match(fn["name"]):
            raise ConfigError(f"{where}: tool {i} needs a function name (letters, digits, _ . -; at most 64)")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ConfigError(f"{where}: tool {fn['name']!r}: parameters must be a JSON schema of type object")
        if fn["name"] in names:
            raise ConfigError(f"{where}: tool {fn['name']!r} is defined twice")
        names.add(fn["name"])
        clean = {"name": fn["name"], "parameters": params}
        if isinstance(fn.get("description"), str):
            clean = {"name": fn["name"], "description": fn["description"], "parameters": params}
        out.append({"type": "function", "function": clean})
    return out


def check_tool_choice(choice, tools: list[dict] | None, where: str = "--tool-choice"):
    """'auto', 'none', 'required', a tool's name, or OpenAI's {"type": "function", "function":
    {"name": NAME}}; returns 'auto', 'none', 'required' or the name."""
    if isinstance(choice, dict):
        fn = choice.get("function")
        choice = fn.get("name") if isinstance(fn, dict) else None
    if choice in TOOL_CHOICES:
        if choice == "required" and not tools:
            raise ConfigError(f"{where} required: no tools were given")
        return choice
    names = [t["function"]["name"] for t in tools or []]
    if not isinstance(choice, str) or choice not in names:
        raise ConfigError(f"{where}: expected auto, none, required or one of the tools ({', '.join(names) or 'none given'})")
    return choice
