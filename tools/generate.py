"""Greedy generation from a bundle with ExecuTorch's own C++ runner (TextLLMRunner), printing the
text and the runner's own prefill/decode rates. `aot run` (next issue) grows out of this.

    .venv/bin/python tools/generate.py build/demo/bundle "def load(fp, *, cls=None):"
"""

import sys
from pathlib import Path

import logging
import warnings

if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if len(sys.argv) != 3:
        raise SystemExit("usage: generate.py BUNDLE PROMPT")
    bundle, prompt = Path(sys.argv[1]), sys.argv[2]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from aot.bundle import PTE_NAME, verify_bundle
    from aot.runner.pte import load_kernels
    from aot.tokenizer import native_output_silenced

    manifest = verify_bundle(bundle)
    load_kernels()  # the runner's CPU ops: llama::custom_sdpa/update_cache, quantized embeddings
    with native_output_silenced():
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    pieces, stats = [], []
    config = GenerationConfig(max_new_tokens=40, temperature=0.0, num_bos=1, echo=False)
    with native_output_silenced((1, 2)):  # the C++ runner logs and echoes tokens itself
        runner = TextLLMRunner(str(bundle / PTE_NAME), str(bundle / manifest["tokenizer"]["file"]))
        runner.generate(prompt, config, token_callback=pieces.append, stats_callback=stats.append)
    s = stats[0]
    prefill_s = (s.prompt_eval_end_ms - s.inference_start_ms) / 1000
    decode_s = (s.inference_end_ms - s.prompt_eval_end_ms) / 1000
    print(f"\n--- prompt ---\n{prompt}\n--- generated ({s.num_generated_tokens} tokens, random weights) ---")
    print("".join(pieces))
    print(f"--- prefill {s.num_prompt_tokens / max(prefill_s, 1e-3):.0f} tok/s, "
          f"decode {max(s.num_generated_tokens - 1, 0) / max(decode_s, 1e-3):.0f} tok/s ---")
