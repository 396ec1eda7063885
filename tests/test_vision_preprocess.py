"""aot/families/vision/image.py against transformers' MllamaImageProcessorPil, bit for bit, on images of many
sizes and modes; the cross-attention mask against transformers' processor helpers; bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from aot.families.vision.image import ImageSpec, cross_attention_mask, open_image, preprocess

TILE = 56  # small tiles keep the test fast; the arithmetic is the same at 560


def _image(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + w * 7 + h)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        return Image.fromarray(rgba[..., :2].copy(), "LA")
    if mode == "L":
        return Image.fromarray(rgba[..., 0].copy(), "L")
    if mode == "P":
        return Image.fromarray(rgba[..., :3].copy(), "RGB").quantize(colors=64)
    if mode == "P-transparent":
        p = Image.fromarray(rgba[..., :3].copy(), "RGB").quantize(colors=16)
        p.info["transparency"] = 3
        return p
    return Image.fromarray(rgba[..., :3].copy(), "RGB")


CASES = [
    ("RGB", 56, 56), ("RGB", 112, 56), ("RGB", 56, 112), ("RGB", 100, 100), ("RGB", 300, 200),
    ("RGB", 1, 1), ("RGB", 3, 500), ("RGB", 500, 3), ("RGB", 2000, 50), ("RGB", 50, 2000),
    ("RGB", 224, 224), ("RGB", 113, 57), ("RGB", 168, 56), ("RGB", 57, 230), ("RGB", 1000, 999),
    ("RGBA", 90, 70), ("LA", 60, 130), ("L", 77, 33), ("P", 120, 45), ("P-transparent", 64, 64),
]


@pytest.fixture(scope="module")
def hf_processor():
    transformers = pytest.importorskip("transformers")
    spec = ImageSpec(tile_size=TILE)
    return transformers.MllamaImageProcessorPil(
        size={"height": TILE, "width": TILE}, max_image_tiles=spec.max_tiles, image_mean=list(spec.mean),
        image_std=list(spec.std), rescale_factor=spec.rescale_factor), spec


@pytest.mark.oracle
@pytest.mark.parametrize("mode, w, h", CASES, ids=[f"{m}-{w}x{h}" for m, w, h in CASES])
def test_preprocessing_matches_transformers_bit_for_bit(hf_processor, mode, w, h):
    hf, spec = hf_processor
    image = _image(mode, w, h)
    want = hf(images=[[image]], return_tensors="np")
    got = preprocess(image, spec)
    assert got["pixel_values"].dtype == want["pixel_values"].dtype == np.float32
    assert np.array_equal(got["pixel_values"], want["pixel_values"])
    assert np.array_equal(got["aspect_ratio_ids"], want["aspect_ratio_ids"])
    assert np.array_equal(got["aspect_ratio_mask"], want["aspect_ratio_mask"])
    assert got["num_tiles"] == want["num_tiles"][0][0]


@pytest.mark.oracle
def test_preprocessing_at_the_real_tile_size():
    transformers = pytest.importorskip("transformers")
    spec = ImageSpec()
    hf = transformers.MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4,
                                              image_mean=list(spec.mean), image_std=list(spec.std))
    for image in (_image("RGB", 800, 600), _image("RGBA", 1500, 300)):
        want, got = hf(images=[[image]], return_tensors="np"), preprocess(image, spec)
        assert np.array_equal(got["pixel_values"], want["pixel_values"])
        assert np.array_equal(got["aspect_ratio_ids"], want["aspect_ratio_ids"])


@pytest.mark.oracle
@pytest.mark.parametrize("ids", [[5, 6, 9, 7, 8], [9, 1, 2], [1, 2, 3, 9], [1, 2, 3]])
def test_cross_attention_mask_matches_transformers(ids):
    pytest.importorskip("transformers")
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask,
    )

    sparse = get_cross_attention_token_mask(ids, 9)
    got = cross_attention_mask(ids, 9, num_tiles=3, max_tiles=4)
    if not sparse:
        assert not got.any()
        return
    want = convert_sparse_cross_attention_mask_to_dense([sparse], [[3]], 4, len(ids))
    assert np.array_equal(got, want)


def test_bad_image_files_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    good = tmp_path / "good.png"
    _image("RGB", 64, 64).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    bomb = tmp_path / "bomb.png"
    Image.new("L", (9000, 9000)).save(bomb)  # 81 MP: refused from its header
    cases = [(tmp_path / "missing.png", "no such file"), (empty, "empty"), (text, "not an image"),
             (truncated, "corrupt or truncated"), (bomb, "9000 x 9000 pixels")]
    for path, needle in cases:
        with pytest.raises(ValueError) as e:
            open_image(path)
        message = str(e.value)
        assert needle in message and str(path) in message and "\n" not in message, message
    assert open_image(good).size == (64, 64)
