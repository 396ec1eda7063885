"""AWS Device Farm's custom test environment: the test spec that runs a packaged target.

A farm format is one module with `SPEC_NAME` and `test_spec(target) -> str`; the package
(aot/farm/__init__.py) is the same for every farm. Device Farm unpacks the test package into
$DEVICEFARM_TEST_PACKAGE_PATH, names the device in $DEVICEFARM_DEVICE_UDID, and keeps whatever the
spec writes under $DEVICEFARM_LOG_DIR as the run's artifacts, which `aot farm collect` reads.
"""

from __future__ import annotations

SPEC_NAME = "testspec.yml"
UPLOAD_TYPES = ("APPIUM_PYTHON_TEST_PACKAGE", "APPIUM_PYTHON_TEST_SPEC", "APPIUM_PYTHON")  # package, spec, run
TEST_HOST = "amazon_linux_2"  # android_test_host: required for Android runs in a custom environment


def package_files() -> dict[str, str]:
    """What Device Farm's upload validator wants in an Appium Python test package, beside ours:
    a requirements.txt and a tests/ folder. Nothing in them runs; the spec runs run_on_device.sh."""
    return {
        "requirements.txt": "",
        "tests/test_placeholder.py": '"""Present for Device Farm\'s package validator only: the test spec runs '
                                     'run_on_device.sh, not pytest."""\n',
    }


def test_spec(target: str) -> str:
    import yaml

    run = f'sh "$DEVICEFARM_TEST_PACKAGE_PATH/{target}/run_on_device.sh" "$DEVICEFARM_DEVICE_UDID" ' \
          f'"$DEVICEFARM_LOG_DIR/aot/{target}/$DEVICEFARM_DEVICE_UDID"'
    spec = {
        "version": 0.1,
        "android_test_host": TEST_HOST,
        "phases": {
            "install": {"commands": ["adb version"]},
            "pre_test": {"commands": ['adb -s "$DEVICEFARM_DEVICE_UDID" wait-for-device']},
            "test": {"commands": [run]},
            "post_test": {"commands": ['ls -R "$DEVICEFARM_LOG_DIR/aot"']},
        },
        "artifacts": ["$DEVICEFARM_LOG_DIR"],
    }
    return (f"# AWS Device Farm test spec for aot target {target} (written by `aot farm package`).\n"
            + yaml.safe_dump(spec, sort_keys=False, width=1 << 16))  # one line per command, as written
