"""Write the tiny random Llama checkpoint the tests use (Hugging Face layout: config.json,
model.safetensors, tokenizer.json, generation_config.json). Needs the test extra (transformers).

    .venv/bin/python tools/tiny_checkpoint.py build/demo/ckpt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import checkpoints  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: tiny_checkpoint.py OUT_DIR")
    out = Path(sys.argv[1])
    if (out / "config.json").is_file():
        print(f"{out}: exists, kept")
    else:
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.write_hf_checkpoint(out)
        print(f"{out}: tiny random Llama 3.2-architecture checkpoint (HF layout)")
