"""aot/backends/xnnpack_patches.py patches ExecuTorch internals of one version: fail as soon as the
installed executorch is another version or any patched hook's source changed, and check that the
patches are the backend instance's state (entered and restored per lowering), not module globals."""

from __future__ import annotations

import hashlib
import importlib
import inspect
from importlib.metadata import version

import pytest

from aot.backends import get_backend
from aot.backends.xnnpack_patches import HOOKS, UPSTREAM


def _resolve(hook: str):
    module, attr = hook.split(":")
    owner, obj = None, importlib.import_module(module)
    for name in attr.split("."):
        owner, obj = obj, getattr(obj, name)
    return owner, attr.split(".")[-1], obj


def test_the_patched_executorch_is_the_installed_one():
    package, pinned = UPSTREAM
    assert version(package) == pinned, f"re-check aot/backends/xnnpack_patches.py against {package} {version(package)}"


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_each_patched_hook_is_as_upstream_wrote_it(hook):
    _, _, obj = _resolve(hook)
    digest = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
    assert digest == HOOKS[hook], f"{hook} changed upstream: re-check the workaround that patches it"


def test_patches_are_entered_and_restored_per_backend_instance():
    hooks = {h: _resolve(h) for h in HOOKS}
    before = {h: inspect.getattr_static(owner, name) for h, (owner, name, _) in hooks.items()}
    a, b = get_backend("xnnpack"), get_backend("xnnpack")
    assert a.int4_hold is not b.int4_hold  # each build's held weights are its own
    with a.lowering_context():
        during = {h: inspect.getattr_static(owner, name) for h, (owner, name, _) in hooks.items()}
    after = {h: inspect.getattr_static(owner, name) for h, (owner, name, _) in hooks.items()}
    assert all(during[h] is not before[h] for h in HOOKS)  # every hook really patched while lowering
    assert after == before  # and put back
