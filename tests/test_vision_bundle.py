"""Vision bundles end to end: `aot build` of a tiny random Mllama (HF layout, tokenizer with
<|image|>, preprocessor_config.json) into one .pte with vision_encoder and text_decoder, run by
ExecuTorch's runtime through aot's runner, against transformers' MllamaForConditionalGeneration:
images of 1-4 tiles, <|image|> first or mid-prompt, text-only turns, prefill then decode steps,
the vision method re-run between decode steps; an int4 bundle against an eager torchao
reference; `aot run --image`; bad images and text bundles given an image; preflight."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from checkpoints import MLLAMA_TILE, MLLAMA_VOCAB, write_mllama_checkpoint  # noqa: E402
from conftest import run_cli  # noqa: E402
from PIL import Image  # noqa: E402

from aot.bundle import open_bundle  # noqa: E402
from aot.runner.mllama import VisionEngine, load_image  # noqa: E402

SEQ, CTX = 8, 48
IMAGE = MLLAMA_VOCAB


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    return write_mllama_checkpoint(tmp_path_factory.mktemp("mllama") / "hf")


def _build(mllama, tmp_path_factory, name: str, *flags: str) -> dict:
    out = tmp_path_factory.mktemp("vision-bundles") / name
    r = run_cli("build", "--checkpoint", mllama[0], "--out", out, "--max-seq-len", SEQ, "--max-context-len", CTX,
                "--json", *flags)
    assert r.exit_code == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def fp32_bundle(vision_fp32_bundle):
    """conftest's (shared with tests/test_context_limit.py): the same seeded weights as `mllama`."""
    return vision_fp32_bundle


@pytest.fixture(scope="module")
def int4_bundle(mllama, tmp_path_factory):
    return _build(mllama, tmp_path_factory, "int4", "--vision-quant", "8da4w")


def _picture(path, w: int, h: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _reference_logits(hf, ids: list[int], image: dict | None) -> torch.Tensor:
    """transformers' logits at every position of `ids`."""
    kw = {}
    if image is not None:
        mask = np.zeros((1, len(ids), 1, 4), dtype=np.int64)
        mask[0, ids.index(IMAGE):, 0, : image["num_tiles"]] = 1
        kw = dict(pixel_values=torch.from_numpy(image["pixel_values"]),
                  aspect_ratio_ids=torch.from_numpy(image["aspect_ratio_ids"]),
                  aspect_ratio_mask=torch.from_numpy(image["aspect_ratio_mask"]),
                  cross_attention_mask=torch.from_numpy(mask))
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), **kw).logits[0]


def _bundle_logits(engine: VisionEngine, ids: list[int], image: dict | None, prefill: int,
                   rerun_vision: dict | None = None) -> torch.Tensor:
    """Prefill ids[:prefill] (chunks of max_seq_len), then one decode call per remaining token;
    the logits after each call, as rows for positions prefill-1 .. len(ids)-1."""
    state, tiles = engine.image_state(image)
    mask = engine.mask(ids, tiles)
    rows = [engine.prefill(ids[:prefill], mask[:, :prefill], state)]
    for pos in range(prefill, len(ids)):
        if rerun_vision is not None:  # another image through the vision method between decode steps
            engine.image_state(rerun_vision)
        rows.append(engine.step([ids[pos]], pos, mask[:, pos:pos + 1], state))
    return torch.stack(rows)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


# (w, h) -> tiles: 1 (28x28), 2 (wide), 3 (tall), 4 (2x2); where <|image|> sits in the prompt
CASES = [((28, 28), 1, "start"), ((56, 28), 2, "middle"), ((20, 80), 3, "start"), ((56, 56), 4, "middle"),
         (None, 0, "text-only")]


@pytest.mark.oracle
@pytest.mark.parametrize("size, tiles, where", CASES, ids=[f"{t}-tiles-{w}" for _, t, w in CASES])
def test_fp32_bundle_matches_transformers(mllama, fp32_bundle, tmp_path, size, tiles, where):
    _, hf = mllama
    engine = VisionEngine(open_bundle(fp32_bundle["path"]))
    image = load_image(_picture(tmp_path / "i.png", *size), engine.spec) if size else None
    assert (image["num_tiles"] if image else 0) == tiles
    text = [5, 9, 14, 27, 31, 8, 77, 120, 64, 3, 18, 250, 42, 11, 7, 90]  # 16 > max_seq_len: two prefill chunks
    ids = [0] + ([IMAGE] + text if where == "start" else text[:5] + [IMAGE] + text[5:]) if size else [0] + text
    prefill = len(ids) - 4
    want = _reference_logits(hf, ids, image)[prefill - 1:]
    rerun = load_image(_picture(tmp_path / "other.png", 40, 40, seed=3), engine.spec) if tiles == 4 else None
    got = _bundle_logits(engine, ids, image, prefill, rerun_vision=rerun)
    assert _relative(got, want) < 1e-3, _relative(got, want)
    if image is not None:  # the image matters: the reference without it differs a lot
        blind = _reference_logits(hf, [t for t in ids if t != IMAGE], None)
        assert _relative(blind[-1], want[-1]) > 0.05


def test_bundle_contract(fp32_bundle):
    """bundle.json carries what an app's runner needs; the .pte has both methods and the metadata."""
    from executorch.runtime import Runtime

    b = open_bundle(fp32_bundle["path"])
    m = b.manifest
    assert m["model"]["family"] == "llama3.2-vision" and set(m["export"]["methods"]) == {"vision_encoder", "text_decoder"}
    assert m["image"]["tile_size"] == MLLAMA_TILE and m["image"]["max_tiles"] == 4
    assert m["image"]["image_token"] == "<|image|>" and m["image"]["image_token_id"] == IMAGE
    assert m["image"]["resample"] == "bilinear" and len(m["image"]["mean"]) == 3
    program = Runtime.get().load_program(str(b.pte))
    names = set(program.method_names)
    assert {"vision_encoder", "text_decoder", "get_max_seq_len", "get_bos_id", "get_eos_ids", "get_image_token_id",
            "get_max_num_tiles", "get_tile_size", "get_num_patches", "get_n_cross_layers"} <= names
    got = {n: list(program.load_method(n).execute([]))[0] for n in
           ("get_image_token_id", "get_max_num_tiles", "get_tile_size", "get_num_patches", "get_n_cross_layers")}
    assert got == {"get_image_token_id": IMAGE, "get_max_num_tiles": 4, "get_tile_size": MLLAMA_TILE,
                   "get_num_patches": 5, "get_n_cross_layers": 2}


@pytest.mark.oracle
def test_run_streams_transformers_greedy_answer(mllama, fp32_bundle, tmp_path):
    """`aot run --image` gives transformers' greedy continuation for the same image and prompt."""
    _, hf = mllama
    picture = _picture(tmp_path / "p.png", 50, 30, seed=5)
    engine = VisionEngine(open_bundle(fp32_bundle["path"]))
    prompt = "<|image|>What is in this image?"
    ids = engine.encode(prompt, with_image=True)
    image = load_image(picture, engine.spec)
    want, seq = [], list(ids)
    for _ in range(8):  # greedy over transformers' forward (its generate() takes another cache path)
        token = int(_reference_logits(hf, seq, image)[-1].argmax())
        if token in engine.eos:
            break
        want.append(token)
        seq.append(token)
    r = run_cli("run", fp32_bundle["path"], "--image", picture, "--prompt", prompt, "--max-new-tokens", 8, "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    got = json.loads(r.stdout)
    assert got["generated_tokens"] == len(want) > 0 and got["image_s"] > 0 and got["prompt_tokens"] == len(ids)
    assert got["text"] == engine.token_bytes(want).decode("utf-8", errors="replace")


@pytest.mark.heavy
def test_int4_bundle_tracks_eager_torchao(mllama, int4_bundle, tmp_path):
    """The 8da4w bundle (text 8da4w, vision 8da4w, 8-bit embeddings) against the same plan applied
    by torchao to the eager model. Both quantize the same weights to the same integers; what may
    differ is the arithmetic around them (XNNPACK quantizes activations per token with its own
    rounding and accumulates in int32, torchao's reference dequantizes and multiplies in fp32), so
    the bound is a small fraction of the quantization error itself, which is measured too."""
    from aot.config import BuildConfig, QuantConfig
    from aot.families.vision.checkpoint import load_hf
    from aot.quant import apply_plan
    from aot.families.vision.family import plans

    path, hf = mllama
    engine = VisionEngine(open_bundle(int4_bundle["path"]))
    image = load_image(_picture(tmp_path / "i.png", 56, 56), engine.spec)
    ids = [0, IMAGE, 5, 9, 14, 27, 31, 8, 77, 120, 64, 3]
    got = _bundle_logits(engine, ids, image, prefill=len(ids) - 3)
    text_plan, vision_plan = plans(BuildConfig(out=tmp_path, checkpoint=path, quant=QuantConfig(), vision_quant="8da4w"))
    eager = load_hf(path, CTX)
    apply_plan(eager.vision, vision_plan, output_name="-")
    apply_plan(eager.text, text_plan, output_name="lm_head")
    with torch.no_grad():
        state = eager.vision(*(torch.from_numpy(image[k]) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")))
        mask = engine.mask(ids, image["num_tiles"])
        p = len(ids) - 3
        rows = [eager.text(torch.tensor([ids[:p]]), torch.arange(p), mask[:, :p], *state)[0]]
        rows += [eager.text(torch.tensor([[ids[i]]]), torch.tensor([i]), mask[:, i:i + 1], *state)[0] for i in range(p, len(ids))]
    ref = torch.stack(rows)
    fp32 = _reference_logits(hf, ids, image)[p - 1:]
    quant_error, kernel_error = _relative(ref, fp32), _relative(got, ref)
    assert quant_error > 1e-3  # the plan did quantize
    assert kernel_error < 0.25 * quant_error + 1e-3, (kernel_error, quant_error)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_text_bundle_refuses_an_image(bundle_fp32, tmp_path):
    picture = _picture(tmp_path / "p.png", 30, 30)
    r = run_cli("run", bundle_fp32["path"], "--image", picture, "--prompt", "hi")
    assert r.exit_code == 3 and "text bundle" in r.stderr and "vision bundle" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_images_are_one_line_errors(fp32_bundle, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    good = _picture(tmp_path / "good.png", 64, 64)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:300])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(bomb)  # 100 MP, a few KB on disk
    for path in (tmp_path / "missing.png", empty, notes, truncated, bomb):
        r = run_cli("run", fp32_bundle["path"], "--image", path, "--prompt", "<|image|>hi")
        assert r.exit_code == 14, (path, r.exit_code, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in r.stderr, r.stderr
    r = run_cli("run", fp32_bundle["path"], "--prompt", "<|image|>hi")
    assert r.exit_code == 3 and "--image" in r.stderr


def test_preflight_stops_builds_the_machine_cannot_hold(tmp_path, monkeypatch):
    """Builds whose estimate exceeds the memory available stop before loading anything, with one
    line and exit 13; nothing is written."""
    from aot import preflight
    from aot.config import BuildConfig
    from aot.families.vision.family import VISION_MODELS, params_by_kind
    from aot.families.vision.family import plans

    for model, gib in (("90b-vision", 23.5), ("11b-vision", 8), ("3b", 2)):
        monkeypatch.setattr(preflight, "available_memory", lambda gib=gib: int(gib * preflight.GIB))
        out = tmp_path / model
        r = run_cli("build", "--model", model, "--random-weights", "--out", out)
        assert r.exit_code == 13, (model, r.stderr)
        assert "GiB of memory at peak" in r.stderr and "--no-preflight" in r.stderr, r.stderr
        assert not out.exists() and not list(tmp_path.glob(f".{model}*"))
    est = preflight.estimate(params_by_kind(VISION_MODELS["11b-vision"]),
                             *plans(BuildConfig(out=tmp_path, model="11b-vision", random_weights=True)))
    assert 6.0 * preflight.GIB < est["pte_bytes"] < 7.0 * preflight.GIB
    r = run_cli("build", "--model", "tiny", "--random-weights", "--vision-quant", "8da4w", "--out", tmp_path / "t")
    assert r.exit_code == 3 and "--vision-quant applies to vision models" in r.stderr


@pytest.mark.heavy
def test_validate_reports_accuracy_and_the_image_effect(int4_bundle):
    """`aot validate` on a vision bundle: generated images of 1-4 tiles, the int4 bundle close to
    the fp32 reference, and much closer than the reference is to itself without the image."""
    r = run_cli("validate", int4_bundle["path"], "--json", "--max-kl", "0.01")
    assert r.exit_code == 0, r.stderr + r.stdout
    result = json.loads(r.stdout)
    assert [i["tiles"] for i in result["images"]] == [1, 2, 3, 4]
    assert result["reference"]["is_build_input"] and result["ok"]
    assert {g["name"] for g in result["gates"]} == {"reference_matches", "image_matters", "max_kl"}
    assert 0 < result["accuracy"]["kl_mean"] < 0.5 * result["image_effect"]["kl_mean"]
    assert result["speed"]["image_encoder_s"]["median"] > 0


def test_validate_fails_a_bundle_that_ignores_the_image(fp32_bundle, monkeypatch):
    """A runner that drops the image (zero state) is scored as what it is: the image_matters gate
    fails with exit 9 even though its text path is exact."""
    from aot.runner import mllama as runner

    real = runner.VisionEngine.image_state
    monkeypatch.setattr(runner.VisionEngine, "image_state", lambda self, image: real(self, None))
    r = run_cli("validate", fp32_bundle["path"], "--json")
    assert r.exit_code == 9, r.stderr
    result = json.loads(r.stdout)
    failed = [g["name"] for g in result["gates"] if not g["ok"]]
    assert failed == ["image_matters"], result["gates"]


def test_text_runners_refuse_vision_bundles(fp32_bundle):
    for args in (("bench", fp32_bundle["path"]), ("validate", fp32_bundle["path"], "--device", "ssh://nowhere.invalid"),
                 ("run", fp32_bundle["path"], "--prompt", "hi", "--engine", "stock")):
        r = run_cli(*args)
        assert r.exit_code == 3 and "vision bundle" in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_meta_vision_layout_is_refused_clearly(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({
        "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
        "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
        "vision_chunk_size": 560, "vision_max_num_chunks": 4, "vision_num_cross_attention_layers": 8}))
    (tmp_path / "consolidated.00.pth").write_bytes(b"")
    r = run_cli("build", "--checkpoint", tmp_path, "--out", tmp_path / "out")
    assert r.exit_code == 4 and "convert_mllama_weights_to_hf" in r.stderr, r.stderr


def test_fingerprint_matches_the_recorded_input_key(fp32_bundle, tmp_path):
    """Release manifests decide "up to date" by this key without building."""
    from aot.config import build_config
    from aot.pipeline import fingerprint

    cfg = build_config(tmp_path / "x", checkpoint=fp32_bundle["checkpoint"]["path"], quant="none", vision_quant="none",
                       max_seq_len=SEQ, max_context_len=CTX)
    assert fingerprint(cfg) == fp32_bundle["build"]["input_key"]


@pytest.fixture(scope="module")
def int8_sink_bundle(mllama, tmp_path_factory):
    return _build(mllama, tmp_path_factory, "int8-sink", "--quant", "none", "--vision-quant", "none",
                  "--kv-cache", "int8", "--attention-sink", "1,12")


@pytest.mark.heavy
def test_int8_sink_text_decoder_tracks_the_fp32_one(fp32_bundle, int8_sink_bundle, tmp_path):
    """The vision text decoder takes --kv-cache int8 and --attention-sink like the text models: its
    ring holds 1 + 12 + max_seq_len slots of the 48 positions; inside the window its logits follow
    the fp32 bundle's, and generation goes past the ring to the context."""
    export = int8_sink_bundle["export"]
    assert export["kv_cache"]["storage"] == "int8" and export["kv_cache"]["positions"] == 1 + 12 + SEQ
    assert export["attention_sink"] == {"sink": 1, "window": 12, "ring_slots": 12 + SEQ}
    picture = load_image(_picture(tmp_path / "p.png", 28, 28), VisionEngine(open_bundle(fp32_bundle["path"])).spec)
    engines = [VisionEngine(open_bundle(b["path"])) for b in (fp32_bundle, int8_sink_bundle)]
    ids = engines[0].encode("<|image|>What is in this image?", with_image=True)[:12]
    fp32, int8 = (_bundle_logits(e, ids, picture, 6) for e in engines)
    assert _relative(int8, fp32) < 0.05
    g = engines[1].generate("<|image|>" + "describe it " * 3, 100, image=tmp_path / "p.png")
    assert g.stop_reason in ("context", "eos") and g.prompt_tokens + g.generated_tokens <= CTX


@pytest.mark.heavy
def test_external_weights_vision_bundle_runs_as_the_single_file_one(mllama, fp32_bundle, tmp_path_factory, tmp_path):
    """fp32_bundle's recipe with --external-weights: the vision encoder's and the text decoder's
    weights in one model.ptd (each method's under its own name), the same answer for an image."""
    split = _build(mllama, tmp_path_factory, "fp32-external", "--quant", "none", "--vision-quant", "none",
                   "--external-weights")
    assert split["data_file"] == "model.ptd" and split["files"]["model.pte"]["bytes"] < split["files"]["model.ptd"]["bytes"] / 3
    picture = _picture(tmp_path / "p.png", 50, 30, seed=5)
    texts = []
    for bundle in (split, fp32_bundle):
        r = run_cli("run", bundle["path"], "--image", picture, "--prompt", "<|image|>What is in this image?",
                    "--max-new-tokens", 8, "--json")
        assert r.exit_code == 0, r.stderr + r.stdout
        texts.append(json.loads(r.stdout)["text"])
    assert texts[0] == texts[1]
