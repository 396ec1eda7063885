"""Native code: registering ExecuTorch's LLM custom ops, and quieting libraries. Native ones:
ExecuTorch's runtime and runner and pytorch-tokenizers log from C++ to the process's file descriptors, and ExecuTorch's bindings also route their logs to Python's
sys.stderr."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings
from contextlib import contextmanager


def quiet_libraries(debug: bool) -> None:
    """No Python warnings and no library log chatter unless --debug."""
    if debug:
        return
    warnings.filterwarnings("ignore")
    import torch  # noqa: F401  (torch configures its loggers on import; set levels after it)

    # torchao logs a warning per optional CUDA extension it cannot load on a CPU machine.
    for name in ("torchao", "torch", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def native_output_silenced(fds: tuple[int, ...] = (2,)):
    """Send native output on these descriptors (1, 2) to /dev/null meanwhile.

    sys.stderr goes to /dev/null with fd 2 (the bindings log through it); sys.stdout keeps
    writing to the real stdout, so text a caller prints while the C++ runner's own printf output
    is discarded still reaches the terminal.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    old_stdout, old_stderr = sys.stdout, sys.stderr
    opened = []
    try:
        with open(os.devnull, "w") as devnull:
            for fd in fds:
                os.dup2(devnull.fileno(), fd)
        if 1 in fds and _writes_to(sys.stdout, 1):
            sys.stdout = open(os.dup(saved[1]), "w", buffering=1, closefd=True)
            opened.append(sys.stdout)
        if 2 in fds:
            sys.stderr = open(os.devnull, "w")
            opened.append(sys.stderr)
        yield
    finally:
        _flush_c_stdio()  # what C code buffered goes to /dev/null, not to the restored terminal
        sys.stdout, sys.stderr = old_stdout, old_stderr
        for f in opened:
            f.close()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def _writes_to(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # captured streams (pytest, CliRunner) have no fd
        return False


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def load_custom_ops() -> None:
    """Register llama::update_cache / llama::custom_sdpa / llama::custom_quantized_sdpa (eager kernels
    and export meta functions) and the per-token quantize ops an int8 KV cache uses."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401
