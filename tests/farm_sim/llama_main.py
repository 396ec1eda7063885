"""SIMULATION ONLY: a host stand-in for ExecuTorch's llama_main in the farm tests.

It takes llama_main's flags and prints what llama_main prints (the generated text, then
`PyTorchObserver {stats json}`), running ExecuTorch's same C++ text runner (TextLLMRunner) through
its Python bindings. The tests copy it into a farm package in place of the arm64 binary, so the
package's run script and `aot farm collect` are exercised end to end without a phone.
"""

import sys
from pathlib import Path


def main(argv):
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from aot.native import native_output_silenced
    from aot.runner.pte import load_kernels
    from aot.runner.text import TextSink, stream_tokenizer

    load_kernels()
    tokenizer, byte_level = stream_tokenizer(Path(flags["tokenizer_path"]), Path.cwd())
    pieces = []
    sink = TextSink(byte_level, pieces.append)
    stats = []
    with native_output_silenced((1, 2)):
        runner = TextLLMRunner(flags["model_path"], str(tokenizer))
        runner.generate(flags["prompt"], GenerationConfig(seq_len=int(flags["seq_len"]), temperature=0.0, num_bos=1, echo=False),
                        token_callback=sink.feed, stats_callback=stats.append)
    sink.close()
    sys.stdout.write(flags["prompt"] + "".join(pieces) + "\n")  # llama_main echoes the prompt
    sys.stdout.write("PyTorchObserver " + stats[-1].to_json_string() + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
