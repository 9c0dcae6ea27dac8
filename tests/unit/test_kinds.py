"""The artifact-kind registry (tasks/kinds.py) against the stages that build each kind:
every kind has a stage yielding tasks, and every stage writes exactly the registry's files."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tasks import config, graph, naming
from tasks.model import SignOptions, TrustedBoot
from tasks.graph import Context
from tasks.kinds import (ARTIFACT_KINDS, BLOB_SIGNATURE_SUFFIXES, CHECKSUM_SUFFIX, KINDS, PROGRAMS, PROVENANCE,
                         REGISTRY)
from tasks.state import Paths

PATHS = Paths(Path("/state"), Path("/out"))


@pytest.fixture
def ctx(make_build):
    """Two builds that between them get every kind: amd64 generic and arm64 rpi4."""
    every = dict(artifacts=ARTIFACT_KINDS, netboot_url="http://10.0.2.2:8080", sign=SignOptions(keyless=True),
                 trusted_boot=TrustedBoot(keys=Path("/keys")))
    builds = (make_build(**every), make_build(arch="arm64", device="rpi4", flavor="board", **every))
    return Context(root=Path("/r"), paths=PATHS, flavors=tuple(b.flavor for b in builds), builds=builds)


def outputs_written(task: dict) -> set[str]:
    return {Path(t).name for t in task["targets"] if Path(t).parent == Path("/out/v3.1.0")}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_a_stage_whose_targets_are_the_registry_files(ctx, kind):
    tasks = list(graph.kind_task(ctx, KINDS[kind])())
    with_kind = [b for b in ctx.builds if kind in b.kinds]
    assert with_kind and [t["name"] for t in tasks] == [b.stem for b in with_kind]
    for b, task in zip(with_kind, tasks):
        expected = set(naming.artifact_files(b.stem, kind))
        if kind == "sign":
            shas = [p.name for p in PATHS.checksums(b)]
            expected = {b.stem + PROVENANCE} | {sha + s for sha in shas for s in BLOB_SIGNATURE_SUFFIXES}
            # kernel, initrd, squashfs and: generic iso + 3 iPXE files + the UKI and its ISO; rpi4 raw + its .xz
            assert len(shas) == {"generic": 9, "rpi4": 5}[b.device]
        assert outputs_written(task) == expected, task["name"]
        assert task["doc"] and task["actions"]


def test_dodo_docstrings_come_from_the_registry(ctx):
    for kind in REGISTRY:
        creator = graph.kind_task(ctx, kind)
        assert creator.__doc__ == kind.doc and creator.__name__ == f"task_{kind.name}"
        assert hasattr(importlib.import_module(f"tasks.stages.{kind.stage}"), "tasks")


def test_registry_is_consistent():
    assert config.ARTIFACT_KINDS == ARTIFACT_KINDS  # the allowed `artifacts:` values
    # implied kinds are not listed by flavors; they come with a listed kind
    assert set(ARTIFACT_KINDS) == {k.name for k in REGISTRY if not k.implied_by}
    for kind in REGISTRY:
        assert set(kind.implied_by) <= set(ARTIFACT_KINDS)
        assert set(kind.built_from) <= set(KINDS) - {kind.name}
        assert all(s.startswith(("-", ".")) for s in kind.suffixes + kind.also_writes)
        assert not (kind.checksummed and not kind.suffixes)
        for need in kind.needs:
            assert need.program in PROGRAMS and need.purpose
    files = [s for kind in REGISTRY for s in kind.suffixes + kind.also_writes]
    assert len(files) == len(set(files))  # no two kinds write the same file
    assert all(not s.endswith(CHECKSUM_SUFFIX) for s in files)


@pytest.mark.parametrize("fields, kinds", [
    # the builder decides whether ISO and raw pull in the boot files
    (dict(artifacts=("iso",)), ("iso", "kernel", "initrd", "squashfs")),
    (dict(artifacts=("iso",), builder="auroraboot"), ("iso",)),
    (dict(artifacts=("ipxe",), builder="auroraboot", netboot_url="http://h"), ("ipxe", "kernel", "initrd", "squashfs")),
    # matrix rules: device and arch limits
    (dict(artifacts=("iso", "ipxe", "sbom"), arch="arm64", netboot_url="http://h"),
     ("iso", "kernel", "initrd", "squashfs", "sbom")),
    (dict(artifacts=("iso", "raw"), arch="arm64", device="rpi4"), ("raw", "xz", "kernel", "initrd", "squashfs")),
    (dict(artifacts=("raw",)), ()),
    (dict(artifacts=("raw",), raw_generic=True), ("raw", "xz", "kernel", "initrd", "squashfs")),
    # the compressed raw image comes with raw unless raw_compression: none
    (dict(artifacts=("raw",), raw_generic=True, raw_compression="none"), ("raw", "kernel", "initrd", "squashfs")),
    (dict(artifacts=("raw",), arch="arm64", device="rpi4", builder="auroraboot"), ("raw", "xz")),
    (dict(artifacts=("iso",), raw_compression="xz"), ("iso", "kernel", "initrd", "squashfs")),  # no raw, no xz
])
def test_matrix_rules_from_the_registry(make_build, fields, kinds):
    assert make_build(**fields).kinds == kinds


@pytest.mark.parametrize("kind, fields, programs", [
    ("iso", {}, {"grub-mkrescue", "xorriso", "mformat", "faketime"}),
    ("iso", {"builder": "auroraboot"}, {"docker"}),
    ("raw", {"arch": "arm64", "device": "rpi4"}, {"sfdisk", "mkfs.vfat", "mmd", "mcopy", "mkfs.ext4", "debugfs",
                                                  "faketime", "unsquashfs"}),
    ("raw", {"raw_generic": True}, {"sfdisk", "mkfs.vfat", "mmd", "mcopy", "mkfs.ext4", "debugfs", "faketime",
                                    "grub-mkimage"}),
    ("squashfs", {}, {"mksquashfs", "tar"}),
    ("xz", {"raw_generic": True}, {"xz"}),
    ("kernel", {}, set()),
    ("sign", {}, {"cosign"}),
])
def test_tools_per_build(make_build, kind, fields, programs):
    assert set(KINDS[kind].tools_for(make_build(**fields))) == programs


def test_paths_of_a_build(make_build):
    b = make_build(artifacts=("ipxe",), netboot_url="http://h")
    assert [p.name for p in PATHS.boot_files(b)] == [f"{b.stem}-kernel", f"{b.stem}-initrd", f"{b.stem}.squashfs"]
    assert PATHS.outputs_of(b, "ipxe") == [Path("/out/v3.1.0") / f"{b.stem}{s}"
                                           for s in (".ipxe", "-ipxe.iso", "-ipxe-usb.img")]
    assert [p.name for p in PATHS.targets_of(b, "kernel")] == [f"{b.stem}-kernel", f"{b.stem}-kernel.sha256"]
    assert PATHS.image_id(b) == Path(f"/state/image/{b.stem}.digest")
    assert PATHS.pulled("ubuntu-24.04", "arm64") == Path("/state/pulled/ubuntu-24.04-arm64.digest")


@pytest.mark.parametrize("ref, repo", [
    ("quay.io/kairos/ubuntu:24.04-core", "quay.io/kairos/ubuntu"),
    ("127.0.0.1:5000/kairos/debian:12-core-amd64-generic-v3.1.0", "127.0.0.1:5000/kairos/debian"),
    ("127.0.0.1:5000/base", "127.0.0.1:5000/base"),
    ("ubuntu@sha256:" + "a" * 64, "ubuntu"),
    ("localhost:5000/x:1@sha256:" + "b" * 64, "localhost:5000/x"),
])
def test_repository_and_pinned(ref, repo):
    assert naming.repository(ref) == repo
    assert naming.pinned(ref, "sha256:" + "c" * 64) == f"{repo}@sha256:{'c' * 64}"
