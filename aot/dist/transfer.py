"""How hard a transfer tries (attempts, backoff, timeouts: from the environment, so tests and slow
links can change them without a flag per command) and the byte progress bar on stderr."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from aot.errors import ConfigError, TransferFailed
from aot.memplan import size


class Retryable(Exception):
    """A failure worth another attempt: connection refused or cut, timeout, HTTP 5xx or 429.
    Internal: after the last attempt it becomes TransferFailed."""


@dataclass(frozen=True)
class Transfer:
    attempts: int = 5  # per file, the first try included
    wait: float = 1.0  # seconds before the first retry; doubled each time up to max_wait
    max_wait: float = 30.0
    timeout: float = 60.0  # seconds to connect, and at most between two reads

    ENV = {"attempts": "AOT_TRANSFER_ATTEMPTS", "wait": "AOT_TRANSFER_WAIT", "timeout": "AOT_TRANSFER_TIMEOUT"}

    @classmethod
    def from_env(cls) -> "Transfer":
        given = {}
        for field, var in cls.ENV.items():
            text = os.environ.get(var)
            if text is None:
                continue
            try:
                value = int(text) if field == "attempts" else float(text)
            except ValueError:
                value = None
            if value is None or value < (1 if field == "attempts" else 0):
                raise ConfigError(f"{var} must be a {'whole number >= 1' if field == 'attempts' else 'number of seconds >= 0'}, "
                                  f"but got '{text}'")
            given[field] = value
        return cls(**given)

    def retrying(self) -> Retrying:
        """`for attempt in t.retrying(): with attempt: ...` retries Retryable only; anything else
        (a 404, a wrong digest, Ctrl-C) ends it at once."""
        return Retrying(stop=stop_after_attempt(self.attempts), reraise=True,
                        wait=wait_exponential(multiplier=self.wait, max=self.max_wait),
                        retry=retry_if_exception_type(Retryable))

    def run(self, what: str, step):
        """`step()` under retries; TransferFailed (one line) when the last attempt fails too."""
        try:
            for attempt in self.retrying():
                with attempt:
                    return step()
        except Retryable as e:
            raise TransferFailed(f"{what}: {e} (after {self.attempts} attempts); check the server and rerun, "
                                 "finished files are kept") from None


class ByteBar:
    """Bytes moved of `total`, as a rich progress bar on a terminal (stderr) and a line per file
    elsewhere (rich draws nothing on a non-terminal until the bar ends); nothing when quiet."""

    def __init__(self, total: int, verb: str, quiet: bool = False):
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet, self.verb, self.total = quiet, verb, total
        self._progress = self._task = None

    def __enter__(self) -> "ByteBar":
        if not self.quiet and self.console.is_terminal:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), console=self.console)
            self._progress.start()
            self._task = self._progress.add_task(self.verb, total=self.total)
        return self

    def file(self, name: str, nbytes: int, detail: str = "") -> None:
        """A file starts moving (`detail`: e.g. 'resuming at 12.0 MiB')."""
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.verb} {escape(name)}")
        else:
            self.console.print(f"[aot] {self.verb} {name} ({size(nbytes)}){', ' + detail if detail else ''}",
                               markup=False, emoji=False)

    def advance(self, nbytes: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, nbytes)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
