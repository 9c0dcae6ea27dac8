"""Test order and the engine lock, for runs under pytest-xdist (`-n 2 --dist loadfile`, set in
pyproject.toml; `-n 0` runs in one process, e.g. with `-s`).

- Order: each test module stays on one worker (loadfile), and workers take modules in collection
  order. The slow integration modules come first (longest first), so the two workers end at about
  the same time; the module that stops the machine's dockerd comes last.
- Engine lock: every test holds a shared flock while it runs (set-up and tear-down included), a
  `stops_engine` test an exclusive one. So the dockerd stop waits until the other worker is
  between two tests, and the other worker waits until dockerd is back. The lock is a file under
  the test cache, so separate pytest sessions on one machine respect it too.
"""
from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from tests.harness import CACHE

# integration modules, slowest first (minutes on 2 cores: boots under TCG, arm64 under qemu-user, xz)
SLOWEST_FIRST = tuple(f"integration/{name}" for name in (
    "test_raw_rpi4", "test_uki_boot", "test_release", "test_iso_boot", "test_rebuild_check", "test_faults",
    "test_pipeline", "test_ipxe_boot", "test_gitlab_ci", "test_registry_cache", "test_supply_chain", "test_ci_cache", "test_bench"))


def _module(item) -> str:
    """`integration/test_x` or `unit/test_x`."""
    path = Path(str(item.fspath))
    return f"{path.parent.name}/{path.stem}"


def pytest_collection_modifyitems(items):
    stopping = {_module(item) for item in items if item.get_closest_marker("stops_engine")}

    def rank(item) -> tuple[int, int]:
        name = _module(item)
        if name in stopping:
            return (2, 0)
        return (0, SLOWEST_FIRST.index(name)) if name in SLOWEST_FIRST else (1, 0)

    items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "engine.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if item.get_closest_marker("stops_engine") else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
