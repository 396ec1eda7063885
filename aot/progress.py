"""Per-stage wall time and peak RSS, shown as the build goes (rich's live status on a terminal,
plain unwrapped lines otherwise, always on stderr so stdout stays clean for --json).

Peak RSS is the kernel's high-water mark (VmHWM), reset per stage through /proc/self/clear_refs:
psutil has no peak figure on Linux (memory_info().rss is the current RSS), and sampling it would
miss short spikes. rich.progress is not used for step counts: on a non-terminal (CI logs) it writes
nothing until the task ends, where these lines show what is running now.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_mib() -> float:
    """Peak resident memory of this process since the last reset_peak_rss(), in MiB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; whole lifetime


# Allocations of at least this many bytes get their own mapping, returned to the OS when freed.
MMAP_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Make freed weights leave the process (glibc only; elsewhere a no-op returning False).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    weight-sized tensors come from the heap, whose freed space fragments and stays resident: a 1B
    build that frees each weight once packed kept 2.7-3.0 GiB resident. A fixed threshold gives
    every tensor of 1 MiB or more its own mapping, unmapped when freed (measured: 2.0 GiB).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> None:
    # Writing 5 resets VmHWM to the current RSS (Linux >= 4.0), so each stage gets its own peak.
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_rss_mib: float
    detail: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"], d["peak_rss_mib"] = round(self.seconds, 3), round(self.peak_rss_mib, 1)
        return d


class Stages:
    """`with stages.stage("lower", "3 methods"):` times a stage and reports it when it ends."""

    def __init__(self, quiet: bool = False, console: Console | None = None, prefix: str = ""):
        self.console = console or Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.prefix = f"{prefix}: " if prefix else ""  # which target, when several build at once
        self.records: list[StageRecord] = []
        self._t0 = time.perf_counter()
        self._status = None  # the live status of the running stage, on a terminal
        self._label = ""

    def _line(self, text: str) -> None:
        """One line as it is: no markup, emoji codes or wrapping at the console's width."""
        self.console.print(text, markup=False, emoji=False, highlight=False, soft_wrap=True)

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        reset_peak_rss()
        start = time.perf_counter()
        label = f"{self.prefix}{name}{' (' + detail + ')' if detail else ''}"
        if self.quiet:
            yield
        elif self.console.is_terminal:
            with self.console.status(f"[bold]{escape(label)}[/bold] ...") as status:
                self._status, self._label = status, label
                try:
                    yield
                finally:
                    self._status = None
        else:
            self._line(f"[aot] {label} ...")
            yield
        record = StageRecord(name, time.perf_counter() - start, peak_rss_mib(), detail)
        self.records.append(record)
        if not self.quiet:
            self.console.print(
                f"[green]✓[/green] {escape(f'{label:<28}')} {record.seconds:8.1f} s   "
                f"peak {record.peak_rss_mib / 1024:6.2f} GiB", emoji=False, highlight=False, soft_wrap=True)

    def progress(self, done: int, total: int) -> None:
        """Within a long stage: `done` of `total` steps finished (on a terminal, in the stage's status)."""
        if self.quiet:
            return
        if self._status is not None:
            self._status.update(f"[bold]{escape(self._label)}[/bold] ... {done}/{total}")
        elif self.console.is_terminal:
            self.console.print(f"  {escape(self.prefix)}{done}/{total}", highlight=False)
        else:
            self._line(f"[aot]   {self.prefix}{done}/{total}")

    @property
    def total_seconds(self) -> float:
        return time.perf_counter() - self._t0

    @property
    def peak_rss_mib(self) -> float:
        return max((r.peak_rss_mib for r in self.records), default=peak_rss_mib())
