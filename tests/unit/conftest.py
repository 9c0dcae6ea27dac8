"""Shared fixtures for the pure unit tests: flavor files, Flavor/Build factories and a raw build.

Nothing here mocks project code; the factories build the real frozen dataclasses.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(ROOT))

from tasks.model import Flavor  # noqa: E402
from tasks.matrix import Build  # noqa: E402
from tasks.providers import PROVIDERS  # noqa: E402
from tasks.state import Paths, write_checksum  # noqa: E402

MIB = 1 << 20


@pytest.fixture
def write_flavor(tmp_path):
    """write_flavor(name, text, subdir="flavors") -> Path of the written file."""

    def write(name: str, text: str, subdir: str = "flavors") -> Path:
        folder = tmp_path / subdir
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(text)
        return path

    return write


FLAVOR_DEFAULTS = dict(
    path=Path("flavors/ubuntu-24.04.yaml"),
    flavor="ubuntu",
    release="24.04",
    base_image="ubuntu:24.04",
    version="v3.1.0",
    variants=("core",),
    k3s_versions=(),
    arches=("amd64",),
    devices=("generic",),
    converter="kairos-init",
    kairos_init_image="quay.io/kairos/kairos-init:v4.3.0",
    registry="quay.io/kairos",
    artifacts=("iso",),
)


@pytest.fixture
def make_flavor():
    """make_flavor(**fields) -> a real Flavor with FLAVOR_DEFAULTS overridden."""

    def make(**fields) -> Flavor:
        return Flavor(**{**FLAVOR_DEFAULTS, **fields})

    return make


def provider_of(version: str) -> str:
    """The provider (k3s, k0s) whose releases look like ``version``."""
    (name,) = [name for name, p in PROVIDERS.items() if p.pattern.match(version)]
    return name


@pytest.fixture
def make_build(make_flavor):
    """make_build(variant, provider_version, arch, device, **flavor_fields) -> Build of a flavor that lists
    them; the provider (k3s, k0s) is the one whose releases look like provider_version."""

    def make(variant="core", provider_version=None, arch="amd64", device="generic", **fields) -> Build:
        provider = provider_of(provider_version) if provider_version else None
        fields.setdefault("variants", (variant,))
        if provider:
            fields.setdefault(PROVIDERS[provider].key, (provider_version,))
        fields.setdefault("arches", (arch,))
        fields.setdefault("devices", (device,))
        return Build(make_flavor(**fields), variant, arch, device, provider=provider,
                     provider_version=provider_version)

    return make


def disk_like(path: Path, size_mib: int = 30) -> Path:
    """A file shaped like a raw disk image: mostly zeros, some text and a little noise (seeded), larger
    than one xz block, so the compressed file has several blocks."""
    rnd = random.Random(16)
    with open(path, "wb") as fh:
        for i in range(size_mib):
            if i % 8 == 0:
                fh.write(rnd.randbytes(MIB // 8) + bytes(7 * MIB // 8))
            elif i % 3 == 0:
                fh.write((f"kairos block {i} " * 4096).encode()[:MIB].ljust(MIB, b"\0"))
            else:
                fh.write(bytes(MIB))
    return path


@pytest.fixture
def raw_build(make_build, tmp_path):
    """A generic raw build whose `<stem>.img` exists, and its Paths."""
    b = make_build(artifacts=("raw",), raw_generic=True)
    paths = Paths(tmp_path / "state", tmp_path / "out")
    img, = paths.outputs_of(b, "raw")
    img.parent.mkdir(parents=True)
    write_checksum(disk_like(img))  # as the raw stage leaves it
    return paths, b, img


@pytest.fixture(autouse=True)
def _run_from_the_project_root(monkeypatch):
    """Messages show flavor paths relative to the working directory when below it; run every test
    from the project root (as `python -m pytest` there does) so tmp_path files show as absolute."""
    monkeypatch.chdir(ROOT)
