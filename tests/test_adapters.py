"""LoRA adapters (aot/adapters.py): PEFT folders merged or unmerged against transformers + peft as
the oracle; many named adapters over one foundation stored once (model.ptd), each a program the
stock runner loads; Meta's QLoRA layout against an independent eager implementation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import checkpoints
from aot.native import native_output_silenced
from aot.runner.pte import PteProgram
from conftest import CTX, SEQ, _build, _once, run_cli
from test_model import TOKENS
from test_spinquant import _act_fake_quant, _logits, _quantize_rows


@pytest.fixture(autouse=True)
def _quiet():
    with native_output_silenced():
        yield


@pytest.fixture(scope="session")
def adapters(hf_ckpt, tmp_path_factory) -> dict:
    """Two PEFT adapters written by peft for the tiny checkpoint: every projection at rank 8, and
    q/v only at rank 4 (rsLoRA)."""
    def make(d):
        one = checkpoints.write_peft_adapter(hf_ckpt, d / "one", seed=1, r=8, alpha=16)
        two = checkpoints.write_peft_adapter(hf_ckpt, d / "two", seed=2, r=4, alpha=8, targets=["q_proj", "v_proj"],
                                             use_rslora=True)
        return {"one": str(one), "two": str(two)}

    return {k: Path(v) for k, v in _once(tmp_path_factory, "peft_adapters", make).items()}


def _peft_logits(hf_ckpt: Path, adapter: Path | None, tokens=TOKENS) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_ckpt, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(tokens).logits


def _source(ckpt: Path, *specs: str, **kw):
    from aot.config import build_config
    from aot.families.text.family import TextFamily

    cfg = build_config(ckpt / "unused", checkpoint=ckpt, max_seq_len=SEQ, max_context_len=CTX, full_logits=True,
                       adapters=specs or None, **kw)
    return cfg, TextFamily().resolve(cfg)


# ---- the eager model against transformers + peft ------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["one", "two"])
def test_merged_adapter_matches_peft(name, hf_ckpt, adapters):
    """The streamed load (each layer merged as it is filled, then quantized; --quant none here)
    gives peft's logits: names mapped, q/k rows permuted like the base's, rsLoRA's scale."""
    from aot.families.text.family import load_quantized

    cfg, src = _source(hf_ckpt, str(adapters[name]), quant="none")
    assert src.adapter_mode == "merged"
    model = load_quantized(src, cfg, src.plan, merged=src.adapters[0])
    want, base = _peft_logits(hf_ckpt, adapters[name]), _peft_logits(hf_ckpt, None)
    got = _logits(model)
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
    assert (want - base).abs().max() > 0.1  # the adapter changes the model: the check has teeth
    if name == "two":
        assert src.adapters[0].scale == pytest.approx(8 / 4**0.5) and src.adapters[0].targets == (
            "attention.wq", "attention.wv")


@pytest.mark.oracle
def test_unmerged_adapter_computes_the_merged_model(hf_ckpt, adapters):
    from aot.adapters import attached
    from aot.families.text.family import load_model

    cfg, src = _source(hf_ckpt, str(adapters["one"]), quant="none", adapter_mode="unmerged")
    assert src.adapter_quant == "none"  # fp32 adapters over an fp32 model
    model = load_model(src, cfg)
    with attached(model, src.adapter_weights(src.adapters[0]), src.adapters[0].scale, "none"):
        got = _logits(model)
    assert (got - _peft_logits(hf_ckpt, adapters["one"])).abs().max() < 1e-4
    assert torch.equal(_logits(model), _logits(load_model(src, cfg)))  # detached: the plain model again


# ---- bad adapters and flags ---------------------------------------------------------------------


def _adapter_copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("config, message", [
    ({"use_dora": True}, "use_dora=true (DoRA's magnitude vectors) is not supported"),
    ({"bias": "all"}, "aot applies adapters without bias terms"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head'] carries full copies"),
    ({"peft_type": "IA3"}, "aot applies LoRA adapters only"),
    ({"r": "eight"}, "r must be an integer rank"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern (per-module ranks or alphas) is not supported"),
])
def test_unsupported_peft_configs_are_refused(config, message, hf_ckpt, adapters, tmp_path):
    bad = _adapter_copy(adapters["one"], tmp_path / "bad", **config)
    result = run_cli("build", "--checkpoint", hf_ckpt, "--adapter", bad, "--out", tmp_path / "o")
    assert result.exit_code == 4 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_adapter_for_another_base_is_refused(hf_ckpt, tmp_path):
    other = checkpoints.write_hf_checkpoint(tmp_path / "wide", hidden_size=256, intermediate_size=512)
    adapter = checkpoints.write_peft_adapter(other, tmp_path / "wide-adapter")
    result = run_cli("build", "--checkpoint", hf_ckpt, "--adapter", adapter, "--out", tmp_path / "o")
    assert result.exit_code == 4 and "the adapter does not fit the model (is it for another base?)" in result.stderr


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "no adapter_config.json inside"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "not readable JSON"),
    (lambda d: ((d / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}'),
                (d / "adapter_model.bin").write_bytes(b"x")), "a pickle: re-save it with safe_serialization=True"),
    (lambda d: ((d / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}'),
                (d / "adapter_model.safetensors").write_bytes(b"\x00" * 16)), "not a readable safetensors file"),
])
def test_broken_adapter_folders_are_one_line(make, message, hf_ckpt, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    make(folder)
    result = run_cli("build", "--checkpoint", hf_ckpt, "--adapter", folder, "--out", tmp_path / "o")
    assert result.exit_code == 4 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("flags, message", [
    (("--adapter", "a=x", "--adapter", "y"), "name each one (--adapter NAME=DIR)"),
    (("--adapter", "a=x", "--adapter", "a=y"), "the name a is given twice"),
    (("--adapter", "a=x", "--adapter-mode", "merged"), "named adapters (NAME=DIR) share one foundation"),
    (("--adapter", "x", "--adapter-mode", "fused"), "--adapter-mode must be merged or unmerged"),
    (("--adapter", "x", "--adapter-quant", "int4"), "--adapter-quant must be 8da8w or none"),
    (("--adapter-mode", "unmerged",), "--adapter-mode/--adapter-quant need --adapter"),
    (("--adapter", "a=x", "--quant", "spinquant"), "an unmerged adapter over --quant spinquant"),
    (("--adapter", "a=x", "--delegate", "qnn"), "adapters are for --delegate xnnpack"),
])
def test_adapter_flags_are_checked_before_building(flags, message, hf_ckpt, tmp_path):
    result = run_cli("build", "--checkpoint", hf_ckpt, "--out", tmp_path / "o", *flags)
    assert result.exit_code == 3 and message in result.stderr, result.stderr


# ---- many adapters, one foundation --------------------------------------------------------------


@pytest.fixture(scope="session")
def bundle_adapters(hf_ckpt, adapters, tmp_path_factory) -> dict:
    """The foundation (model.pte) and one named adapter's program over one model.ptd. (Lowering
    costs about a minute a program here; bench/adapters.py builds four adapters, and checks that a
    bundle of two holds the same files.)"""
    return _once(tmp_path_factory, "bundle_adapters", lambda d: _build(
        d / "adapters", hf_ckpt, "--adapter", f"two={adapters['two']}"))


def test_named_adapters_share_one_foundation(bundle_adapters, adapters, release_bundles):
    root, files = Path(bundle_adapters["path"]), bundle_adapters["files"]
    assert bundle_adapters["data_file"] == "model.ptd"
    assert {"model.pte", "model.ptd", "adapter-two.pte"} <= set(files)
    (record,) = bundle_adapters["adapters"]
    assert record["name"] == "two" and record["file"] == "adapter-two.pte" and record["mode"] == "unmerged"
    assert record["quant"] == "8da8w" and record["rank"] == 4 and record["targets"] == ["attention.wq", "attention.wv"]
    # the foundation is in model.ptd once: the adapter's program is its graph and its own weights
    # (int8 here: a quarter of their fp32 bytes), not a second copy of the foundation
    extra = files["adapter-two.pte"]["bytes"] - files["model.pte"]["bytes"]
    assert 0 < extra < record["stored_bytes"], (extra, record["stored_bytes"])
    assert str(adapters["two"] / "adapter_model.safetensors") in bundle_adapters["inputs"]
    assert [n for n in files if n.endswith(".ptd")] == ["model.ptd"]
    # and it is the foundation an ordinary --external-weights build of the same recipe writes
    plain = json.loads((Path(release_bundles["root"]) / "short" / "bundle.json").read_text())["files"]
    assert files["model.ptd"]["sha256"] == plain["model.ptd"]["sha256"]
    assert files["model.pte"]["sha256"] == plain["model.pte"]["sha256"]
    assert (root / "model.ptd").is_file()


def _eager_quantized(hf_ckpt: Path, adapters: dict, name: str | None):
    from aot.adapters import attached
    from aot.families.text.family import load_quantized

    cfg, src = _source(hf_ckpt, f"two={adapters['two']}")
    model = load_quantized(src, cfg, src.plan)
    if name is None:
        return model, None
    adapter = next(a for a in src.adapters if a.name == name)
    return model, attached(model, src.adapter_weights(adapter), adapter.scale, src.adapter_quant)


@pytest.mark.parametrize("name", [None, "two"])
def test_each_program_computes_its_adapter(name, bundle_adapters, hf_ckpt, adapters):
    """Every program over the shared model.ptd gives the eager model with that adapter attached
    (the foundation: none), to the 8-bit dynamic activation kernels' rounding."""
    from contextlib import nullcontext

    root = Path(bundle_adapters["path"])
    program = "model.pte" if name is None else f"adapter-{name}.pte"
    fwd = PteProgram(root / program, root / "model.ptd").forward()
    got = fwd(TOKENS[:, :SEQ], torch.tensor([0]))[0]
    model, ctx = _eager_quantized(hf_ckpt, adapters, name)
    with ctx or nullcontext():
        want = _logits(model, TOKENS[:, :SEQ])[0, -1]
    others = [n for n in (None, "two") if n != name]
    assert (got - want).abs().max() < 0.05, (got - want).abs().max()
    for other in others:  # and it is not one of the other programs
        m, c = _eager_quantized(hf_ckpt, adapters, other)
        with c or nullcontext():
            assert (got - _logits(m, TOKENS[:, :SEQ])[0, -1]).abs().max() > 0.1


def test_stock_runner_runs_each_adapter_over_the_shared_weights(bundle_adapters):
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    root = Path(bundle_adapters["path"])
    texts = {}
    for name in (None, "two"):
        result = run_cli("run", root, "--prompt", "def load(fp):", "--max-new-tokens", 8, "--json",
                         *(["--adapter", name] if name else []))
        assert result.exit_code == 0, result.stderr
        texts[name] = json.loads(result.stdout)["text"]
        if name is not None:  # ExecuTorch's runner, as an app calls it: the adapter's .pte, the shared .ptd
            runner = TextLLMRunner(str(root / f"adapter-{name}.pte"), str(root / "tokenizer.json"),
                                   str(root / "model.ptd"))
            out = []
            runner.generate("def load(fp):", GenerationConfig(max_new_tokens=8, temperature=0.0, num_bos=1, echo=False),
                            token_callback=out.append)
            assert "".join(out) == texts[name]
    assert texts[None] != texts["two"], texts  # two different models


def test_unknown_adapter_is_one_line(bundle_adapters):
    result = run_cli("run", bundle_adapters["path"], "--prompt", "x", "--adapter", "three")
    assert result.exit_code == 3 and "has no adapter of that name; its adapters: two" in result.stderr


def test_validate_an_adapter_against_the_merged_reference(bundle_adapters, adapters):
    reports = {}
    for name in (None, "two"):
        result = run_cli("validate", bundle_adapters["path"], "--skip-speed", "--max-tokens", 48, "--json",
                         *(["--adapter", name] if name else []))
        # exit 9: the tiny random model's 8da4w agreement is under validate's own sanity gate
        assert result.exit_code in (0, 9) and "Traceback" not in result.stderr, result.stderr
        reports[name] = json.loads(result.stdout)
    ref = reports["two"]["reference"]["adapter"]
    assert ref == {"name": "two", "path": str(adapters["two"]), "merged": "fp32", "is_build_input": True}
    assert "adapter" not in reports[None]["reference"]
    one, base = reports["two"]["accuracy"], reports[None]["accuracy"]
    assert one["ppl_reference"] != base["ppl_reference"]  # another reference: the adapter merged in
    # each program is as close to its own reference as the foundation is to the base model (its
    # quantization error), not an adapter's worth of difference away
    assert one["kl_mean"] < 3 * base["kl_mean"] + 0.05, (one, base)


# ---- Meta's QLoRA layout ------------------------------------------------------------------------


QLORA_RANK, QLORA_SCALE = 16, 2.0


def write_qlora_checkpoint(hf_ckpt: Path, path: Path) -> Path:
    """A tiny checkpoint in the layout of Meta's Llama3.2-*-QLORA_INT4_EO8 releases: the linears
    int4 g32 (int8 values, scales, zeros), output int8 per channel, embedding int8 per row, norms in
    float, and a bf16 adaptor (X.adaptor.A.weight [rank, in], X.adaptor.B.weight [out, rank]) on
    every linear of every layer; params.json with quantization_args and lora_args."""
    from test_model import our_model

    model = our_model(hf_ckpt)
    sd, gen = {}, torch.Generator().manual_seed(3)
    for name, p in model.named_parameters(remove_duplicate=False):
        p = p.detach()
        fqn = name.removesuffix(".weight")
        if name.endswith("norm.weight"):
            sd[name] = p.clone()
            continue
        bits, group = (8, 0) if fqn in ("output", "tok_embeddings") else (4, 32)
        q, s = _quantize_rows(p, bits, group)
        sd[name], sd[f"{fqn}.scales"] = q, (s.squeeze(-1) if group == 0 else s)
        if bits == 4:
            sd[f"{fqn}.zeros"] = torch.zeros_like(s)
            out_f, in_f = p.shape
            sd[f"{fqn}.adaptor.A.weight"] = (torch.randn(QLORA_RANK, in_f, generator=gen) * 0.1).bfloat16()
            sd[f"{fqn}.adaptor.B.weight"] = (torch.randn(out_f, QLORA_RANK, generator=gen) * 0.1).bfloat16()
    meta = checkpoints.write_meta_checkpoint(hf_ckpt, path)
    torch.save(sd, meta / "consolidated.00.pth")
    params = json.loads((meta / "params.json").read_text())
    params["quantization_args"] = {"group_size": 32}
    params["lora_args"] = {"rank": QLORA_RANK, "scale": QLORA_SCALE}
    (meta / "params.json").write_text(json.dumps(params))
    return meta


@pytest.fixture(scope="session")
def qlora_ckpt(hf_ckpt, tmp_path_factory) -> Path:
    return Path(_once(tmp_path_factory, "qlora_ckpt",
                      lambda d: str(write_qlora_checkpoint(hf_ckpt, d / "qlora-int4-eo8"))))


def _eager_qlora(ckpt: Path):
    """Meta's QLoRA recipe written independently of aot's loader: dequantized INT4 weights behind
    8-bit per-token activation fake quantization, plus scale * B(A x) in float beside each."""
    from aot.families.text.checkpoint import open_checkpoint
    from aot.families.text.model import Transformer

    sd = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    args = open_checkpoint(ckpt).args
    model = Transformer(args, CTX, full_logits=True)
    model.init_buffers()
    with torch.no_grad():
        for name, p in model.named_parameters():
            fqn = name.removesuffix(".weight")
            if f"{fqn}.scales" in sd:
                q, s = sd[name].float(), sd[f"{fqn}.scales"].float()
                s = s[:, None] if s.dim() == 1 else s
                p.copy_((q.reshape(q.shape[0], s.shape[1], -1) * s[..., None]).reshape(q.shape))
            else:
                p.copy_(sd[name])

    def hook(fqn):
        a, b = sd[f"{fqn}.adaptor.A.weight"].float(), sd[f"{fqn}.adaptor.B.weight"].float()

        def forward(module, inputs):
            x = inputs[0]
            return torch.nn.functional.linear(_act_fake_quant(x), module.weight) + QLORA_SCALE * (x @ a.T) @ b.T
        return forward

    for i, layer in enumerate(model.layers):
        for kind in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                     "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"):
            lin = layer.get_submodule(kind)
            lin.forward = (lambda f, m: (lambda x: f(m, (x,))))(hook(f"layers.{i}.{kind}"), lin)
    model.output.register_forward_pre_hook(lambda m, a: (_act_fake_quant(a[0]),))
    return model.eval()


@pytest.fixture(scope="session")
def bundle_qlora(qlora_ckpt, tmp_path_factory) -> dict:
    return _once(tmp_path_factory, "bundle_qlora", lambda d: _build(d / "qlora", qlora_ckpt))


def test_qlora_checkpoint_loads_as_stored_and_records_its_recipe(bundle_qlora, qlora_ckpt):
    (record,) = bundle_qlora["adapters"]
    assert record["kind"] == "qlora" and record["rank"] == QLORA_RANK and record["scale"] == QLORA_SCALE
    assert record["mode"] == "unmerged" and record["quant"] == "none" and record["file"] == "model.pte"
    assert len(record["targets"]) == 7 and record["layers"] == [0, 1]
    assert bundle_qlora["quant"]["prequantized"]["group_size"] == 32
    assert "quantize" not in [s["name"] for s in bundle_qlora["build"]["stages"]]  # not requantized


def test_qlora_bundle_matches_the_independent_eager_recipe(bundle_qlora, qlora_ckpt):
    got = PteProgram(Path(bundle_qlora["path"]) / "model.pte").forward()(TOKENS[:, :SEQ], torch.tensor([0]))
    ref = _eager_qlora(qlora_ckpt)
    want = _logits(ref, TOKENS[:, :SEQ])[:, -1]
    # As the SpinQuant tests bound it: by the reference's own sensitivity to a 1e-6 relative nudge of
    # its embedding output (8-bit embeddings put layer 0's activations on rounding ties).
    sensitivity = []
    for nudge in (1 + 1e-6, 1 - 1e-6):
        hook = ref.tok_embeddings.register_forward_hook(lambda m, i, o, k=nudge: o * k)
        sensitivity.append((_logits(ref, TOKENS[:, :SEQ])[:, -1] - want).abs())
        hook.remove()
    diff = (got - want).abs()
    assert diff.max() <= 2 * max(s.max() for s in sensitivity) + 1e-3, (diff.max(), [s.max() for s in sensitivity])
    assert got.argmax().item() == want.argmax().item()
    # and the adaptors matter: without them the model is another one
    sd = torch.load(qlora_ckpt / "consolidated.00.pth", weights_only=True)
    assert any(k.endswith("adaptor.A.weight") for k in sd)


def test_qlora_checkpoint_problems_are_one_line(qlora_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(qlora_ckpt, bad)
    sd = torch.load(bad / "consolidated.00.pth", weights_only=True)
    sd["layers.0.attention.wq.adaptor.A.weight"] = sd["layers.0.attention.wq.adaptor.A.weight"][:8]
    torch.save(sd, bad / "consolidated.00.pth")
    result = run_cli("build", "--checkpoint", bad, "--out", tmp_path / "o")
    assert result.exit_code == 4 and "layers.0.attention.wq: adaptor A [8, 128]" in result.stderr, result.stderr
    result = run_cli("build", "--checkpoint", qlora_ckpt, "--adapter-mode", "merged", "--adapter", "x",
                     "--out", tmp_path / "o")
    assert result.exit_code == 3 and "QLoRA release carries its own adaptors" in result.stderr, result.stderr


def test_manifest_adapters_are_beside_the_manifest_and_keyed_by_content(hf_ckpt, adapters, tmp_path):
    from aot.manifest import load_manifest
    from aot.pipeline import fingerprint

    for where in ("a", "b"):
        shutil.copytree(adapters["two"], tmp_path / where / "adapters" / "two")
        (tmp_path / where / "release.yaml").write_text(f"""
version: 1
targets:
  - name: features
    checkpoint: {hf_ckpt}
    adapters: [two=adapters/two]
""")
    keys = []
    for where in ("a", "b"):
        (target,) = load_manifest(tmp_path / where / "release.yaml").targets
        assert target.build.adapters == (f"two={tmp_path / where / 'adapters' / 'two'}",)
        assert target.build.external_weights is True  # named adapters share one model.ptd
        keys.append(fingerprint(target.build))
    assert keys[0] == keys[1]  # the folder moved, the bytes did not: the same build
    weights = tmp_path / "b" / "adapters" / "two" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    sd = load_file(weights)
    next(iter(sd.values()))[0, 0] += 1
    save_file(sd, weights)
    (target,) = load_manifest(tmp_path / "b" / "release.yaml").targets
    assert fingerprint(target.build) != keys[0]
