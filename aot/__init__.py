"""aot: ahead-of-time compiler for on-device LLMs (Llama 3.2 -> ExecuTorch bundles)."""

__version__ = "0.1.0"
