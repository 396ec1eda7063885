"""SIMULATION ONLY: an `adb` that runs the device's commands on this host, for the farm tests.

`adb -s SERIAL shell CMD` runs CMD with /bin/sh, `push SRC DST` copies, with the device path
/data/local/tmp mapped under $AOT_SIM_ROOT; `getprop` answers with a simulated device's
properties. Nothing here talks to a phone.
"""

import os
import shutil
import subprocess
import sys

ROOT = os.environ["AOT_SIM_ROOT"]
DEVICE = "/data/local/tmp"


def here(path):
    return path.replace(DEVICE, ROOT + DEVICE)


def main(argv):
    if argv and argv[0] == "-s":
        argv = argv[2:]
    if not argv or argv[0] in ("version", "wait-for-device"):
        print("Android Debug Bridge (simulation for aot's farm tests)")
        return 0
    if argv[0] == "devices":
        print("List of devices attached\nSIM-1\tdevice")
        return 0
    if argv[0] == "push":
        dst = here(argv[2])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(argv[1], dst)
        return 0
    if argv[0] == "shell":
        bin_dir = os.path.join(ROOT, "bin")
        env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
        return subprocess.run(["sh", "-c", here(" ".join(argv[1:]))], env=env).returncode
    print(f"adb simulation: unsupported {argv}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
