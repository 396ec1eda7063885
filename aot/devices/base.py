"""Devices a bundle is validated on: the Device interface, shell quoting, and local commands
with a time limit (the transports: aot/devices/ssh.py, aot/devices/adb.py)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from aot.errors import DeviceError


@dataclass
class Completed:
    code: int
    stdout: str
    stderr: str


class Device:
    """One device. `name` is how the user wrote it (ssh://pi@board:2222, adb:R5CT...)."""

    name: str
    kind: str  # "ssh" | "adb"

    def push(self, local: Path, remote: str) -> None:
        raise NotImplementedError

    def run(self, command: str, timeout: float) -> Completed:
        raise NotImplementedError

    def pull(self, remote: str, local: Path) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def sha256(self, remote: str) -> str | None:
        """The sha256 of a file on the device, None if it is not there (so pushes can be skipped)."""
        done = self.run(f"sha256sum {quote(remote)} 2>/dev/null", timeout=60)
        word = done.stdout.split()[0] if done.code == 0 and done.stdout.split() else ""
        return word if len(word) == 64 else None


def quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def run_local(argv: list[str], timeout: float, what: str) -> Completed:
    """Run a local client program (ssh, scp, adb) with a hard timeout; never waits on a prompt."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, errors="replace")
    except subprocess.TimeoutExpired:
        raise DeviceError(f"{what}: no answer within {timeout:.0f} s; check that the device is on and "
                          "reachable, or raise --device-timeout") from None
    except FileNotFoundError:
        raise DeviceError(f"{what}: '{argv[0]}' is not installed or not on PATH") from None
    return Completed(done.returncode, done.stdout, done.stderr)
