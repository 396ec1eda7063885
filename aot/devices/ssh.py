"""ssh://[user@]host[:port]: a Linux machine reached with the system's OpenSSH client.

The system `ssh`/`scp` are used as a user runs them, so ~/.ssh/config, agents, keys and
known_hosts apply. aot adds only BatchMode=yes (fail instead of prompting for a password or an
unknown host key: a CI job must not hang) and ConnectTimeout; host-key checking is left as the
user's configuration has it and never turned off. --ssh-option KEY=VALUE passes more `-o` options
(IdentityFile, UserKnownHostsFile, ...).
"""

from __future__ import annotations

import re
from pathlib import Path

from aot.devices.base import Completed, Device, run_local
from aot.errors import ConfigError, DeviceError

_URL = re.compile(r"^ssh://(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]]+\]|[^:/@]+)(?::(?P<port>\d+))?/?$")

# What OpenSSH prints -> what the user should do. First match wins.
_FAILURES = (
    ("Host key verification failed", "its host key is unknown or has changed; check it, then add it with "
     "`ssh-keyscan {port_flag}{host} >> ~/.ssh/known_hosts` (aot never turns host-key checking off)"),
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "its host key has changed; if that is expected, remove the old "
     "key with `ssh-keygen -R {host}` and add the new one"),
    ("Permission denied", "it refused our key; add your public key to ~/.ssh/authorized_keys on the device, "
     "or pass --ssh-option IdentityFile=KEY"),
    ("Connection refused", "the connection was refused; is sshd running there, and is the port right?"),
    ("Could not resolve hostname", "the host name does not resolve; check the spelling or use its IP address"),
    ("timed out", "the connection timed out; is the device on and on this network?"),
    ("No route to host", "there is no route to it; is the device on and on this network?"),
)


class SshDevice(Device):
    kind = "ssh"

    def __init__(self, url: str, options: tuple[str, ...] = (), timeout: float = 60.0):
        m = _URL.match(url)
        if not m:
            raise ConfigError(f"--device {url}: expected ssh://[user@]host[:port]")
        self.name, self.user, self.host, self.port = url, m["user"], m["host"].strip("[]"), m["port"]
        self.timeout = timeout
        self.options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(min(timeout, 30)))}"]
        for opt in options:
            key, sep, value = opt.partition("=")
            if not sep or not key or not value:
                raise ConfigError(f"--ssh-option {opt}: expected KEY=VALUE, e.g. IdentityFile=~/.ssh/id_ed25519")
            self.options += ["-o", f"{key}={Path(value).expanduser() if key.endswith('File') else value}"]
        self.target = f"{self.user}@{self.host}" if self.user else self.host

    def _check(self, done: Completed, what: str) -> Completed:
        if done.code != 255:  # ssh's own failures exit 255; anything else is the remote command's
            return done
        message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "ssh failed"
        for needle, hint in _FAILURES:
            if needle.lower() in done.stderr.lower():
                port_flag = f"-p {self.port} " if self.port else ""
                raise DeviceError(f"--device {self.name}: {what}: " + hint.format(host=self.host, port_flag=port_flag))
        raise DeviceError(f"--device {self.name}: {what}: {message}")

    def run(self, command: str, timeout: float | None = None) -> Completed:
        argv = ["ssh", *self.options, *(["-p", self.port] if self.port else []), self.target, command]
        return self._check(run_local(argv, timeout or self.timeout, f"--device {self.name}"), "ssh")

    def _scp(self, src: str, dst: str, what: str) -> None:
        argv = ["scp", "-q", *self.options, *(["-P", self.port] if self.port else []), src, dst]
        done = self._check(run_local(argv, max(self.timeout, 600), f"--device {self.name}"), what)
        if done.code != 0:
            raise DeviceError(f"--device {self.name}: {what} failed: {done.stderr.strip() or done.code}")

    def push(self, local: Path, remote: str) -> None:
        self._scp(str(local), f"{self.target}:{remote}", f"copying {local.name} there")

    def pull(self, remote: str, local: Path) -> None:
        self._scp(f"{self.target}:{remote}", str(local), f"copying {remote} back")

    def describe(self) -> dict:
        done = self.run("uname -srm; nproc 2>/dev/null; grep -m1 MemTotal /proc/meminfo 2>/dev/null; "
                        "grep -m1 -E '^(model name|Hardware|Model)' /proc/cpuinfo 2>/dev/null; "
                        "cat /sys/firmware/devicetree/base/model 2>/dev/null; echo")
        lines = done.stdout.splitlines() + [""] * 5
        info = {"transport": "ssh", "name": self.name, "uname": lines[0]}
        if lines[1].strip().isdigit():
            info["cores"] = int(lines[1])
        for line in lines[2:]:
            if line.startswith("MemTotal"):
                info["memory_mib"] = round(int(line.split()[1]) / 1024)
            elif ":" in line:
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.strip():
                info["model"] = line.strip("\x00 ")
        return info
