"""`aot validate` for vision bundles: image + prompt pairs, the bundle against the fp32 reference.

Each pair is `<|begin_of_text|><|image|>` + the first --prompt-tokens tokens of --text, with one
image: a few generated here (no downloads; `aot.validate_vision.test_images`, sized to fill 1, 2,
3 and 4 tiles) or the user's --image files. For every pair the bundle is scored teacher-forced
(ExecuTorch runtime, one token per call over the KV cache) and so is the reference checkpoint
(aot.families.vision, fp32 eager): the same perplexity ratio, mean KL, top-1 agreement and max logit error
as text bundles. The reference is also run without the image (the same text, no <|image|>), and
the report says how far that moves it: the "image_matters" gate fails a bundle whose distance to
the reference is not well below the distance of a model that never saw the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from aot.bundle import Bundle
from aot.errors import CheckpointError, ConfigError
from aot.families.vision.checkpoint import args_from_hf_config
from aot.families.vision.family import VisionFamily
from aot.families.vision.image import preprocess
from aot.families.vision.model import zero_image_state
from aot.files import sha256_file
from aot.metrics import check_gates, compare_rows
from aot.native import native_output_silenced
from aot.runner.mllama import VisionEngine, load_image
from aot.texts import text_file

if TYPE_CHECKING:
    from PIL import Image

# A bundle must be closer to the image-conditioned reference than this fraction of how far the
# reference moves when the image is taken away (mean KL).
IMAGE_MATTERS_FRACTION = 0.5


def test_images(tile: int) -> list[tuple[str, "Image.Image"]]:
    """Deterministic synthetic pictures (gradients, shapes, stripes, noise) whose sizes fill 1, 2,
    3 and 4 tiles of `tile` pixels."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    out = []
    y, x = np.mgrid[0:tile, 0:tile]
    gradient = np.stack([x * 255 // tile, y * 255 // tile, (x + y) * 127 // tile], -1).astype(np.uint8)
    out.append(("gradient-1-tile", Image.fromarray(gradient)))
    shapes = Image.new("RGB", (2 * tile, tile), (250, 250, 245))
    d = ImageDraw.Draw(shapes)
    d.ellipse((tile // 8, tile // 8, tile - tile // 8, tile - tile // 8), fill=(200, 30, 30))
    d.rectangle((tile + tile // 6, tile // 4, 2 * tile - tile // 6, 3 * tile // 4), fill=(30, 60, 200))
    out.append(("shapes-2-tiles", shapes))
    stripes = np.zeros((3 * tile, tile, 3), dtype=np.uint8)
    stripes[(np.arange(3 * tile) // max(tile // 8, 1)) % 2 == 0] = (20, 160, 60)
    out.append(("stripes-3-tiles", Image.fromarray(stripes)))
    noise = rng.integers(0, 256, (2 * tile, 2 * tile, 3), dtype=np.uint8)
    out.append(("noise-4-tiles", Image.fromarray(noise)))
    return out


def validate_vision(bundle: Bundle, cfg, stages, images: list[Path] | None = None) -> dict:
    source = text_file(cfg.text)
    with stages.stage("load bundle"):
        engine = VisionEngine(bundle)
        text_ids = list(engine.tokenizer.encode(source.read_text(errors="replace"), 0, 0))
        length = min(cfg.prompt_tokens, engine.max_context_len - 2)
        text_ids = text_ids[:length]
        if len(text_ids) < 2:
            raise ConfigError(f"--text {source}: needs at least two tokens of text")
        if images:
            pairs = [(str(p), load_image(p, engine.spec)) for p in images]
        else:
            pairs = [(name, preprocess(img, engine.spec)) for name, img in test_images(engine.spec.tile_size)]
    with stages.stage("reference", "fp32 eager"):
        reference, model = reference_model(bundle, cfg.reference)
    rows_ref, rows_got, rows_blind, targets, per_image, image_s = [], [], [], [], [], []
    for name, image in pairs:
        ids = [engine.bos, engine.image_token] + text_ids
        with stages.stage("score", f"{name}: {image['num_tiles']} tiles, {len(ids)} tokens"):
            ref = eager_logits(model, ids, image, engine)
            blind = eager_logits(model, [engine.bos] + text_ids, None, engine)
            got = engine.score(ids, image)
            image_s.append(engine.image_s)
        # Predictions of the text tokens (rows from <|image|> on); the blind run lacks that row.
        ref, got, target = ref[1:-1], got[1:-1], torch.tensor(ids[2:])
        blind = blind[:-1]
        per_image.append({"image": name, "tiles": image["num_tiles"], **compare_rows(ref, got, target),
                          "image_effect_kl": _kl(ref, blind)})
        rows_ref.append(ref)
        rows_got.append(got)
        rows_blind.append(blind)
        targets.append(target)
    ref, got, blind, target = (torch.cat(r) for r in (rows_ref, rows_got, rows_blind, targets))
    accuracy = compare_rows(ref, got, target)
    effect = {"kl_mean": round(_kl(ref, blind), 5),
              "top1_agreement": round((ref.argmax(-1) == blind.argmax(-1)).float().mean().item(), 4),
              "max_abs_logit_change": round((ref - blind).abs().max().item(), 4)}
    gates = check_gates(cfg.gates, accuracy, None)
    limit = round(IMAGE_MATTERS_FRACTION * effect["kl_mean"], 6)
    gates.insert(1, {"name": "image_matters", "value": accuracy["kl_mean"], "threshold": limit, "op": "<=",
                     "ok": accuracy["kl_mean"] <= limit,
                     "hint": "the bundle is about as far from the reference as a model that never saw the image"})
    return {
        "bundle": str(bundle.root),
        "model": bundle.manifest["model"]["name"],
        "quant": f"{bundle.manifest['quant']['scheme']} (vision {bundle.manifest['quant']['vision']['scheme']})",
        "text": {"file": str(source), "tokens": len(text_ids)},
        "reference": reference,
        "accuracy": accuracy,
        "image_effect": effect,
        "images": per_image,
        "speed": {"image_encoder_s": {"median": round(float(np.median(image_s)), 3), "runs": [round(s, 3) for s in image_s]}},
        "gates": gates,
        "ok": all(g["ok"] for g in gates),
    }


def _kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref.float(), -1), torch.log_softmax(other.float(), -1)
    return max((p.exp() * (p - q)).sum(-1).mean().item(), 0.0)


def reference_model(bundle: Bundle, reference: Path | None):
    recorded = bundle.manifest.get("checkpoint")
    if reference is None:
        if not recorded:
            raise ConfigError(f"{bundle.root} was built from random weights; pass --reference CHECKPOINT to validate it")
        reference = Path(recorded["path"])
    reference = Path(reference).expanduser()
    args = args_from_hf_config(reference / "config.json")
    if json.loads(json.dumps(args.to_dict())) != bundle.manifest["model"]["args"]:
        raise CheckpointError(f"--reference {reference} is a different model from the one {bundle.root} was built "
                              "from; give the checkpoint the bundle was built from")
    inputs = bundle.manifest.get("inputs", {})
    files = sorted(reference.glob("*.safetensors"))
    same = all(inputs.get(str(f), {}).get("sha256") == sha256_file(f) for f in files)
    model = VisionFamily().reference(reference, bundle.manifest["export"]["max_context_len"])
    return {"checkpoint": str(reference), "layout": "hf", "is_build_input": same}, model


def eager_logits(model, ids: list[int], image: dict | None, engine) -> torch.Tensor:
    """The reference's logits at every position, [len(ids), vocab]: one forward over all of ids."""
    model.text.reset_cache()
    with torch.no_grad(), native_output_silenced():
        if image is None:
            state, tiles = zero_image_state(model.args), 0
        else:
            state = model.vision(*(torch.from_numpy(image[k]) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")))
            tiles = image["num_tiles"]
        mask = engine.mask(ids, tiles)
        rows = [model.text(torch.tensor([[t]]), torch.tensor([i]), mask[:, i:i + 1], *state)[0] for i, t in enumerate(ids)]
    return torch.stack(rows).float()
