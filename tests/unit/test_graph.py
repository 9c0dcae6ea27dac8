"""The doit task graph for the real-world flavors (flavors/upstream), built
without Docker or network: names, dependencies on small digest files only."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import urllib3
from doit.exceptions import TaskError

from tasks import graph
from tasks.stages import convert, extract, push, resolve

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = REPO / "flavors" / "upstream"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    os.environ["KAIROS_STATE"] = str(tmp_path_factory.mktemp("state"))
    try:
        return graph.load(REPO, str(UPSTREAM))
    finally:
        del os.environ["KAIROS_STATE"]


@pytest.fixture(scope="module")
def listed(tmp_path_factory) -> set[str]:
    """`doit list --all` against a daemon address that does not exist: loading
    the graph must not need Docker or a registry."""
    env = dict(os.environ, KAIROS_FLAVORS=str(UPSTREAM), KAIROS_STATE=str(tmp_path_factory.mktemp("st")),
               DOCKER_HOST="unix:///nonexistent/docker.sock")
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "list", "--all",
                           "--quiet"], capture_output=True, text=True, env=env, check=True)
    return set(proc.stdout.split())


def test_every_build_has_its_stage_subtasks(ctx, listed):
    assert len(ctx.builds) == 28
    assert sorted({b.flavor.flavor for b in ctx.builds}) == ["alpine", "debian", "fedora", "opensuse", "rockylinux",
                                                             "ubuntu"]
    for b in ctx.builds:
        for stage in ("convert", "push", "kernel", "initrd", "squashfs", "sbom", "trivy", "grype", "sign",
                      "build"):
            assert f"{stage}:{b.stem}" in listed
        assert (f"iso:{b.stem}" in listed) == (b.device == "generic")
        assert (f"ipxe:{b.stem}" in listed) == (b.device == "generic" and b.arch == "amd64")
        for stage in ("raw", "xz", "carrier"):  # raw_compression: xz by default
            assert (f"{stage}:{b.stem}" in listed) == (b.device == "rpi4")
    assert "iso:kairos-ubuntu-24.04-core-amd64-generic-v3.1.0" in listed
    assert "raw:kairos-ubuntu-24.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1" in listed
    assert "xz:kairos-ubuntu-24.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1" in listed
    assert not any("amd64-rpi" in name for name in listed)


def test_rocky_linux_builds(ctx, listed):
    rocky = [b for b in ctx.builds if b.flavor.flavor == "rockylinux"]
    assert [(b.variant, b.arch, b.device) for b in rocky] == [
        ("core", "amd64", "generic"), ("core", "arm64", "generic"),
        ("standard", "amd64", "generic"), ("standard", "arm64", "generic")]
    assert [b.image for b in rocky] == [
        "quay.io/kairos/rockylinux:9-core-amd64-generic-v3.1.0",
        "quay.io/kairos/rockylinux:9-core-arm64-generic-v3.1.0",
        "quay.io/kairos/rockylinux:9-standard-amd64-generic-v3.1.0-k3sv1.28.2-k3s1",
        "quay.io/kairos/rockylinux:9-standard-arm64-generic-v3.1.0-k3sv1.28.2-k3s1"]
    for b in rocky:
        assert b.base.ref == "rockylinux/rockylinux:9"
        assert f"iso:{b.stem}" in listed and f"sign:{b.stem}" in listed
        assert (f"ipxe:{b.stem}" in listed) == (b.arch == "amd64")
        assert f"raw:{b.stem}" not in listed  # generic only, no raw_generic
    assert "iso:kairos-rockylinux-9-standard-arm64-generic-v3.1.0-k3sv1.28.2+k3s1" in listed
    assert {"pull:rockylinux-rockylinux-9-amd64", "pull:rockylinux-rockylinux-9-arm64"} <= listed


def test_carrier_is_keyed_on_the_compressed_image_only(ctx):
    """The carrier of an rpi4 build depends on `<stem>.img.xz.sha256`, which the xz task writes, and
    on nothing of the converted image: a new image digest with the same disk image rebuilds nothing."""
    from tasks.stages import carrier, xz

    shas = {t["name"]: t["file_dep"] for t in carrier.tasks(ctx)}
    targets = {t["name"]: t["targets"] for t in xz.tasks(ctx, "xz")}
    rpi = [b for b in ctx.builds if b.device == "rpi4"]
    assert sorted(shas) == sorted(targets) == sorted(b.stem for b in rpi)
    for b in rpi:
        assert shas[b.stem] == [str(ctx.paths.version_dir("v3.1.0") / f"{b.stem}.img.xz.sha256")]
        assert shas[b.stem][0] in targets[b.stem]


def test_one_resolve_per_reference_and_one_pull_per_arch(ctx, listed):
    resolves = sorted(n for n in listed if n.startswith("resolve:"))
    # 6 distinct bases + the one kairos-init image they share
    assert len(resolves) == 7
    assert "resolve:quay.io-kairos-kairos-init-v4.3.0" in resolves
    assert "resolve:rockylinux-rockylinux-9" in resolves
    pulls = {n for n in listed if n.startswith("pull:")}
    assert "pull:ubuntu-24.04-arm64" in pulls and "pull:fedora-42-amd64" in pulls
    assert "pull:fedora-42-arm64" not in pulls  # fedora flavor is amd64 only
    for task in resolve.resolve_tasks(ctx):
        assert task["uptodate"] == [False]


def test_conversion_depends_on_small_digest_files_only(ctx):
    tasks = {t["name"]: t for t in convert.tasks(ctx)}
    b = next(b for b in ctx.builds if b.stem == "kairos-ubuntu-24.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1")
    task = tasks[b.stem]
    state = ctx.paths.state
    assert task["file_dep"] == [str(state / "pulled" / "ubuntu-24.04-arm64.digest"),
                                str(state / "pulled" / "quay.io-kairos-kairos-init-v4.3.0-arm64.digest")]
    assert task["targets"] == [str(state / "image" / f"{b.stem}.digest")]
    for t in list(extract.tasks(ctx, "squashfs")) + list(push.tasks(ctx)):
        assert all(dep.startswith(str(state)) and dep.endswith(".digest") for dep in t["file_dep"]), t["name"]


def test_conversion_key_changes_with_one_flag(ctx):
    """The config_changed key differs when one flag differs, and only for that build."""
    from dataclasses import replace

    b = ctx.builds[0]
    fips = replace(b, flavor=replace(b.flavor, fips=True))
    assert convert.dockerfile(b, "D", "D") != convert.dockerfile(fips, "D", "D")
    assert convert.kairos_init_flags(fips)[-3:] == ["--fips", "--version", "v3.1.0"]


@pytest.mark.parametrize("broken", [
    urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead(0 bytes read)"),
    requests.exceptions.ConnectionError("('Connection aborted.', ConnectionRefusedError(111))"),
])
def test_a_broken_engine_stream_is_one_clean_task_error(broken):
    """Found when dockerd was stopped while a carrier was being pushed: the push's progress stream
    ended in urllib3's ProtocolError, which doit printed as a traceback."""
    def push():
        raise broken
    fn, args = graph.action(push)
    result = fn(*args)
    assert isinstance(result, TaskError)
    assert str(broken) in result.message and "bash ci/setup.sh" in result.message
