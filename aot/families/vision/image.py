"""Image preprocessing for Llama 3.2 Vision (Mllama) bundles, with pillow and numpy only.

It reproduces transformers' MllamaImageProcessorPil bit for bit (tests/test_vision_preprocess.py
checks it on images of many sizes and modes), so an app's runner can code against one documented
recipe:

1. RGB: images with an alpha band or a transparency key are composited onto white, others converted.
2. Canvas: among the tile arrangements (a, b) with a * b <= max_tiles (canvas a*tile high, b*tile
   wide), the smallest scale >= 1 if one exists, else the largest below 1, where an arrangement's
   scale is min(canvas_h / h, canvas_w / w); ties go to the smallest canvas area.
3. Resize (PIL bilinear on uint8) to fit that canvas keeping the aspect ratio, each side clipped to
   [tile, canvas side] first; pad with zeros to the canvas, bottom and right.
4. Rescale (x * rescale_factor in float64, then float32) and normalise ((x - mean) / std in float32),
   padding included; split into row-major tiles; pad to max_tiles tiles with zeros.
5. aspect_ratio_id = 1 + index of (a, b) in the arrangement list; aspect_ratio_mask = 1 for the
   first a * b tiles (and always the first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# Larger images are refused before they are decoded (a decompression bomb names itself by its header).
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class ImageSpec:
    tile_size: int = 560
    max_tiles: int = 4
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    resample: str = "bilinear"

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> "ImageSpec":
        size = cfg.get("size") or {}
        return cls(tile_size=int(size.get("height", 560)), max_tiles=int(cfg.get("max_image_tiles", 4)),
                   mean=tuple(cfg.get("image_mean", cls.mean)), std=tuple(cfg.get("image_std", cls.std)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)))

    def to_dict(self) -> dict:
        return {"tile_size": self.tile_size, "max_tiles": self.max_tiles, "mean": list(self.mean),
                "std": list(self.std), "rescale_factor": self.rescale_factor, "resample": self.resample}


@lru_cache(maxsize=16)
def arrangements(max_tiles: int) -> tuple[tuple[int, int], ...]:
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def best_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    canvases = np.array(arrangements(max_tiles)) * tile
    heights, widths = canvases.T
    scale_h, scale_w = heights / height, widths / width
    scales = np.where(scale_w > scale_h, scale_h, scale_w)
    up = scales[scales >= 1]
    chosen = canvases[scales == (np.min(up) if len(up) else np.max(scales[scales < 1]))]
    best = chosen[np.argmin(chosen[:, 0] * chosen[:, 1])] if len(chosen) > 1 else chosen[0]
    return int(best[0]), int(best[1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    target_w, target_h = int(np.clip(width, tile, canvas_w)), int(np.clip(height, tile, canvas_h))
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def to_rgb(image):
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image, spec: ImageSpec) -> dict:
    """A PIL image -> pixel_values f32 [1, 1, T, 3, tile, tile], aspect_ratio_ids i64 [1, 1],
    aspect_ratio_mask i64 [1, 1, T] and num_tiles (the tiles this image fills)."""
    from PIL import Image

    rgb = to_rgb(image)
    width, height = rgb.size
    tile = spec.tile_size
    canvas_h, canvas_w = best_canvas(height, width, spec.max_tiles, tile)
    new_h, new_w = fit_to_canvas(height, width, canvas_h, canvas_w, tile)
    resized = np.asarray(rgb.resize((new_w, new_h), resample=Image.Resampling.BILINEAR), dtype=np.uint8)
    padded = np.zeros((3, canvas_h, canvas_w), dtype=np.uint8)
    padded[:, :new_h, :new_w] = resized.transpose(2, 0, 1)
    x = (padded.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean, std = np.array(spec.mean, dtype=np.float32), np.array(spec.std, dtype=np.float32)
    x = ((x.T - mean) / std).T
    rows, cols = canvas_h // tile, canvas_w // tile
    tiles = x.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    pixel_values = np.zeros((1, 1, spec.max_tiles, 3, tile, tile), dtype=np.float32)
    pixel_values[0, 0, : rows * cols] = tiles
    mask = np.zeros((1, 1, spec.max_tiles), dtype=np.int64)
    mask[0, 0, 0] = 1
    mask[0, 0, : rows * cols] = 1
    ids = np.array([[arrangements(spec.max_tiles).index((rows, cols)) + 1]], dtype=np.int64)
    return {"pixel_values": pixel_values, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask, "num_tiles": rows * cols}


def cross_attention_mask(ids: list[int], image_token_id: int, num_tiles: int, max_tiles: int) -> np.ndarray:
    """[1, len(ids), 1, max_tiles] int64: which tokens see the image's tiles (transformers' rule for
    one image: every token from the first <|image|> on; none before it)."""
    mask = np.zeros((1, len(ids), 1, max_tiles), dtype=np.int64)
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if where:
        mask[0, where[0]:, 0, :num_tiles] = 1
    return mask


def open_image(path: Path, max_pixels: int = MAX_PIXELS):
    """Open and fully decode an image file; every problem is one ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"--image {path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"--image {path}: the file is empty")
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"--image {path}: not an image pillow can read (PNG, JPEG, GIF, BMP, WebP, ...)") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"--image {path}: cannot be opened ({e})") from None
    w, h = image.size
    if getattr(image, "is_animated", False):  # (n_frames would walk every frame of a hostile file)
        raise ValueError(f"--image {path}: animated (more than one frame); give a still image (a PNG or JPEG of "
                         "the frame to describe)")
    if w < 1 or h < 1 or w * h > max_pixels:
        raise ValueError(f"--image {path}: {w} x {h} pixels is outside 1 .. {max_pixels:,} pixels; "
                         "downscale it first (it would only be resized to at most 4 tiles anyway)")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"--image {path}: corrupt or truncated ({e})") from None
    return image
