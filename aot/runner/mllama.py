"""Run a Llama 3.2 Vision bundle: image + prompt in, streamed text out.

ExecuTorch's MultimodalRunner (1.5.1) serves early-fusion models only (a `token_embedding` method
and image embeddings that take KV-cache positions); Mllama's cross-attention design does not fit
it, so this is the runner, written against the bundle contract in README ("Vision bundles"):

1. Read the image (pillow), preprocess it with bundle.json's `image` spec (aot/families/vision/image.py:
   tiles, aspect-ratio id and mask), run `vision_encoder` once: the image state, one (K, V) per
   cross-attention layer.
2. Tokenize `<|begin_of_text|>` + prompt; `<|image|>` marks where the image is (prepended when the
   prompt has none). Each token's row of the cross-attention mask lists the image tiles it sees:
   every token from the first `<|image|>` on sees all of the image's tiles, earlier ones none.
3. Prefill `text_decoder(tokens, input_pos, cross_attention_mask, *state)` in chunks of at most
   get_max_seq_len tokens, then decode one token at a time with the last row's mask. A text-only
   turn passes a zero state and a zero mask.

Needs the ExecuTorch runtime, torch (its tensors), pillow and numpy; not transformers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from aot.bundle import Bundle
from aot.errors import ConfigError, ImageError
from aot.families.vision.image import ImageSpec, cross_attention_mask, open_image, preprocess
from aot.families.vision.model import IMAGE_TOKEN
from aot.native import native_output_silenced
from aot.runner.engines import Generation, OnText, _rates, fit_prompt, keep_tail, sample_tokens, stop_reason
from aot.runner.pte import PteProgram, load_kernels
from aot.runner.text import TextSink, TokenBytes
from aot.tokenizer import load_tokenizer


def is_vision_bundle(bundle: Bundle) -> bool:
    return bundle.manifest.get("image") is not None


def image_spec(manifest: dict) -> ImageSpec:
    spec = manifest["image"]
    return ImageSpec(tile_size=spec["tile_size"], max_tiles=spec["max_tiles"], mean=tuple(spec["mean"]),
                     std=tuple(spec["std"]), rescale_factor=spec["rescale_factor"], resample=spec["resample"])


def load_image(path: Path, spec: ImageSpec) -> dict:
    """Open and preprocess an image file; every problem is one ImageError naming the file."""
    try:
        return preprocess(open_image(path), spec)
    except ValueError as e:
        raise ImageError(str(e)) from None


class VisionEngine:
    name = "python"

    def __init__(self, bundle: Bundle):
        load_kernels()
        start = time.perf_counter()
        with native_output_silenced():
            program = PteProgram(bundle.pte, bundle.data_path)
            self.meta = program.metadata()
            self.vision = program.program.load_method("vision_encoder")
            self.text = program.program.load_method("text_decoder")
            text_meta = program.program.metadata("text_decoder")
            self.state_shapes = [tuple(text_meta.input_tensor_meta(i).sizes()) for i in range(3, text_meta.num_inputs())]
        self.load_s = time.perf_counter() - start
        self.spec = image_spec(bundle.manifest)
        self.tokenizer = self.token_bytes = None  # a --random-weights bundle may have none: ids only
        if bundle.manifest.get("tokenizer"):
            self.tokenizer, _ = load_tokenizer(bundle.tokenizer)
            self.token_bytes = TokenBytes(bundle.tokenizer)
        self.bundle = bundle
        self.bos, self.eos = self.meta["get_bos_id"], set(self.meta["get_eos_ids"])
        self.image_token = self.meta["get_image_token_id"]
        self.max_tiles = self.meta["get_max_num_tiles"]
        self.max_seq_len, self.max_context_len = self.meta["get_max_seq_len"], self.meta["get_max_context_len"]
        self._loaded = False
        self.image_s = 0.0

    # -- pieces (aot validate uses them for teacher-forced scoring) --

    def encode(self, prompt: str, with_image: bool) -> list[int]:
        if self.tokenizer is None:
            _ = self.bundle.tokenizer  # raises: no tokenizer, rebuild with --tokenizer
        ids = [self.bos] + list(self.tokenizer.encode(prompt, 0, 0))
        if with_image and self.image_token not in ids:
            ids.insert(1, self.image_token)
        if not with_image and self.image_token in ids:
            raise ConfigError(f"the prompt holds {IMAGE_TOKEN} but no --image was given; pass --image FILE "
                              f"or drop {IMAGE_TOKEN}")
        return ids

    def image_state(self, image: dict | None) -> tuple[list[torch.Tensor], int]:
        """(state, tiles the image fills); a zero state for a text-only turn."""
        if image is None:
            return [torch.zeros(s) for s in self.state_shapes], 0
        start = time.perf_counter()
        with native_output_silenced():
            state = list(self.vision.execute([torch.from_numpy(image["pixel_values"]),
                                              torch.from_numpy(image["aspect_ratio_ids"]),
                                              torch.from_numpy(image["aspect_ratio_mask"])]))
        self.image_s = time.perf_counter() - start
        return state, image["num_tiles"]

    def mask(self, ids: list[int], tiles: int) -> torch.Tensor:
        """[1, len(ids), max_tiles] float32."""
        m = cross_attention_mask(ids, self.image_token, tiles, self.max_tiles) if tiles else \
            np.zeros((1, len(ids), 1, self.max_tiles), dtype=np.int64)
        return torch.from_numpy(m[:, :, 0].astype(np.float32))

    def step(self, tokens: list[int], pos: int, mask: torch.Tensor, state) -> torch.Tensor:
        """Logits [vocab] after `tokens`, placed at positions pos.. (at most max_seq_len of them)."""
        out = self.text.execute([torch.tensor([tokens]), torch.arange(pos, pos + len(tokens)), mask, *state])
        return out[0][0]

    def prefill(self, ids: list[int], mask: torch.Tensor, state) -> torch.Tensor:
        logits = None
        for pos in range(0, len(ids), self.max_seq_len):
            end = min(pos + self.max_seq_len, len(ids))
            logits = self.step(ids[pos:end], pos, mask[:, pos:end], state)
        return logits

    def score(self, ids: list[int], image: dict | None) -> torch.Tensor:
        """Teacher-forced logits [len(ids), vocab], one token per call (row i predicts ids[i + 1])."""
        if len(ids) > self.max_context_len:
            raise ConfigError(f"{len(ids)} tokens do not fit this bundle's context ({self.max_context_len})")
        with native_output_silenced():
            state, tiles = self.image_state(image)
            mask = self.mask(ids, tiles)
            return torch.stack([self.step([t], i, mask[:, i:i + 1], state) for i, t in enumerate(ids)]).float()

    # -- generation --

    def generate(self, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 on_text: OnText | None = None, image: Path | None = None, truncate: bool = False) -> Generation:
        pre = load_image(image, self.spec) if image is not None else None
        ids = self.encode(prompt, pre is not None)
        given = len(ids)
        keep = fit_prompt(given, max_new_tokens, self.max_context_len, truncate)
        ids = keep_tail(ids, keep)
        if pre is not None and self.image_token not in ids:  # the cut took <|image|>: it leads the kept tail
            ids = [ids[0], self.image_token] + ids[2:]
        sink = TextSink(byte_level=False, on_text=on_text)
        with native_output_silenced():
            state, tiles = self.image_state(pre)
            start = time.perf_counter()  # the image's encoder time is reported apart
            mask = self.mask(ids, tiles)
            row = mask[:, -1:]  # every generated token sees what the prompt's last token sees
            steps = min(max_new_tokens, self.max_context_len - len(ids))
            stamps = sample_tokens(self.prefill(ids, mask, state), len(ids), steps, temperature, seed, self.eos,
                                   lambda token: sink.feed(self.token_bytes([token])),
                                   lambda token, pos: self.step([token], pos, row, state))
        text = sink.close()
        load_s = 0.0 if self._loaded else self.load_s
        self._loaded = True
        ttft, prefill, decode = _rates(len(ids), start, stamps, 0.0)
        return Generation(text, self.name, len(ids), len(stamps), load_s, ttft, prefill, decode,
                          self.image_s if pre is not None else 0.0, stop_reason(len(stamps), steps, max_new_tokens),
                          self.max_context_len, given if keep < given else None)
