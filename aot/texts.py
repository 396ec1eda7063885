"""The embedded demo model and its held-out text: the defaults of --checkpoint (--model demo),
--text and --calibration. At the bottom of the import layers (config, families, backends,
validate and the CLI all read these)."""

from __future__ import annotations

from pathlib import Path

from aot.errors import ConfigError

DEMO_DIR = Path(__file__).parent / "demo"  # the embedded demo model and its held-out text
DEMO_CHECKPOINT = DEMO_DIR / "model"
DEMO_INSTRUCT = DEMO_DIR / "instruct"  # its chat and tool-calling fine-tune (tools/train_demo_instruct.py)
DEMO_CHECKPOINTS = {"demo": DEMO_CHECKPOINT, "demo-instruct": DEMO_INSTRUCT}  # --model NAME ships its weights
DEMO_TEXT = DEMO_DIR / "heldout.txt"


def text_file(given: Path | None) -> Path:
    """--text (or --calibration) as given, else the demo's held-out text; one line if missing."""
    path = Path(given).expanduser() if given else DEMO_TEXT
    if not path.is_file():
        raise ConfigError(f"--text {path}: no such file; give a UTF-8 text file to score on")
    return path
