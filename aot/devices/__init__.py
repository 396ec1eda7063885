"""Where `aot validate --device` runs a bundle: one small interface, one module per transport.

A `Device` pushes files, runs a command with a timeout, pulls files and describes itself. The
transports are `host` (this machine, aot's own validate), `ssh://[user@]host[:port]` (Linux boards
and remote machines with Python and the ExecuTorch wheel; devices/ssh.py) and `adb[:SERIAL]`
(Android phones, ExecuTorch's native llama_main runner; devices/adb.py). Every failure to reach or
use a device is a DeviceError naming the device and what to do.
"""

from __future__ import annotations

from aot.devices.adb import AdbDevice
from aot.devices.base import Completed, Device, DeviceError, quote, run_local
from aot.devices.ssh import SshDevice
from aot.errors import ConfigError


def open_device(spec: str, ssh_options: tuple[str, ...] = (), adb: str | None = None,
                timeout: float = 60.0) -> Device:
    """`ssh://[user@]host[:port]` or `adb[:SERIAL]` (`host` is handled by the caller)."""
    if spec.startswith("ssh://"):
        return SshDevice(spec, ssh_options, timeout)
    if spec == "adb" or spec.startswith("adb:"):
        return AdbDevice(spec, adb, timeout)
    raise ConfigError(f"--device {spec}: give host, ssh://[user@]host[:port] or adb[:SERIAL]")


__all__ = ["Completed", "Device", "DeviceError", "open_device", "quote", "run_local"]
