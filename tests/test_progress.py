"""Stage timings and peak RSS (bundle.json build.stages) and the progress lines on stderr."""

from __future__ import annotations

import io
import os
import re

import pytest

import psutil
from rich.console import Console

from aot.progress import Stages, StageRecord, peak_rss_mib


def _stages(terminal: bool, **kw) -> tuple[Stages, io.StringIO]:
    buf = io.StringIO()
    return Stages(console=Console(file=buf, force_terminal=terminal, width=60, highlight=False), **kw), buf


def _times(text: str) -> str:
    """Times and peaks replaced, their padding kept (stages here take under 10 s)."""
    return re.sub(r"\d\.\d s   peak +\d+\.\d\d GiB", "T s   peak M GiB", text)


PAD = " " * 6  # the separator, then the time's width of 8


def test_stage_records_keep_their_json_shape():
    r = StageRecord("lower", 1.23456, 512.345, "xnnpack").to_dict()
    assert r == {"name": "lower", "seconds": 1.235, "peak_rss_mib": 512.3, "detail": "xnnpack"}


def test_plain_lines_when_not_a_terminal_unwrapped_and_as_given():
    stages, buf = _stages(terminal=False, prefix="llama-3.2-3b-instruct-spinquant-xnnpack")
    with stages.stage("lower", "xnnpack [sm8650]"):
        stages.progress(1, 2)
    with stages.stage("serialize"):
        pass
    assert _times(buf.getvalue()).splitlines() == [
        "[aot] llama-3.2-3b-instruct-spinquant-xnnpack: lower (xnnpack [sm8650]) ...",
        "[aot]   llama-3.2-3b-instruct-spinquant-xnnpack: 1/2",
        "✓ llama-3.2-3b-instruct-spinquant-xnnpack: lower (xnnpack [sm8650])" + PAD + "T s   peak M GiB",
        "[aot] llama-3.2-3b-instruct-spinquant-xnnpack: serialize ...",
        "✓ llama-3.2-3b-instruct-spinquant-xnnpack: serialize" + PAD + "T s   peak M GiB",
    ]
    assert [r.name for r in stages.records] == ["lower", "serialize"]


def test_short_labels_line_up():
    stages, buf = _stages(terminal=False)
    with stages.stage("export", "forward"):
        pass
    assert _times(buf.getvalue()) == "[aot] export (forward) ...\n✓ export (forward)" + " " * 12 + PAD + "T s   peak M GiB\n"


def test_quiet_prints_nothing_and_still_records():
    stages, buf = _stages(terminal=False, quiet=True)
    with stages.stage("export"):
        stages.progress(1, 1)
    assert buf.getvalue() == "" and len(stages.records) == 1


def test_on_a_terminal_steps_update_the_status_in_place():
    stages, buf = _stages(terminal=True)
    with stages.stage("lower"):
        status = stages._status
        stages.progress(3, 7)
        assert "3/7" in str(status.renderable.text)
    assert stages._status is None
    out = buf.getvalue()
    assert "✓" in out and "  3/7" not in out  # in the live status, not a line per step


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's per-process peak reset")
def test_peak_rss_is_the_stages_high_water_mark_not_the_current_rss():
    stages, _ = _stages(terminal=False, quiet=True)
    with stages.stage("big"):
        block = bytearray(256 << 20)  # written (zero-filled), so resident
        del block
    with stages.stage("small"):
        pass
    big, small = (r.peak_rss_mib for r in stages.records)
    rss_now = psutil.Process().memory_info().rss / 2**20
    assert big >= rss_now + 200  # the freed block still counts in the first stage's peak ...
    assert small < big - 200  # ... and the reset gives the next stage its own
    assert peak_rss_mib() >= rss_now - 1
