"""Session fixtures for the integration tests: the real Docker engine, the local
registry on 127.0.0.1:5000, a minimal Debian rootfs base image and a kairos-init
STAND-IN image (a shell script that records its flags; it is not kairos-init).

Expensive things are built once per session (per xdist worker); the mmdebstrap rootfs tarball is
cached under /var/tmp/kairos-test-cache and reused across runs and workers when present. The plain
helpers these fixtures and the tests use (flavor builders, the stand-in script, Workspace.doit,
namespace clean-up) are in tests/harness.py, importable without pytest.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import urllib.request
import uuid
from pathlib import Path

import docker
import docker.errors
import pytest

from tests.harness import (CACHE, LZ4, REGISTRY, STANDIN_SCRIPT, Result, Workspace, build_push, builtin_doc,
                           drop_namespace, standin_doc, write_flavor)


@pytest.fixture(scope="session")
def engine():
    try:
        client = docker.from_env(timeout=600)
        client.ping()
        urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=5).close()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Docker engine or local registry not available ({exc}); run: bash ci/setup.sh")
    return client


@pytest.fixture(scope="session")
def ns(engine) -> str:
    """A registry namespace of this test session, removed again at the end."""
    namespace = f"{REGISTRY}/it-{uuid.uuid4().hex[:8]}"
    yield namespace
    drop_namespace(engine, namespace)
    try:  # keep BuildKit's layer cache (it makes reruns fast) but bounded
        engine.api.prune_builds(keep_storage=10 * 2**30)
    except docker.errors.APIError:
        pass


@pytest.fixture(scope="session")
def rootfs_tar() -> Path:
    """Minimal Debian bookworm rootfs (mmdebstrap minbase), cached across runs."""
    tar = CACHE / "bookworm-minbase-amd64.tar"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "rootfs.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other xdist worker waits for the one that builds it
        if not tar.exists():
            partial = tar.with_name(tar.name + ".partial")
            subprocess.run(["mmdebstrap", "--variant=minbase", "--arch=amd64", "--format=tar", "bookworm",
                            str(partial), "http://deb.debian.org/debian"], check=True, stdin=subprocess.DEVNULL)
            partial.rename(tar)
    return tar


@pytest.fixture(scope="session")
def bases(engine, ns, rootfs_tar, tmp_path_factory) -> dict[str, str]:
    """Two base tags (same content) in the local registry, built from the rootfs."""
    ctx = tmp_path_factory.mktemp("base")
    os.link(rootfs_tar, ctx / "rootfs.tar")
    (ctx / "Dockerfile").write_text("FROM scratch\nADD rootfs.tar /\nCMD [\"/bin/bash\"]\n")
    refs = {"a": f"{ns}/base-a:1", "b": f"{ns}/base-b:1"}
    image, _ = engine.images.build(path=str(ctx), tag=refs["a"], rm=True)
    for ref in refs.values():
        repo, _, name = ref.rpartition(":")
        image.tag(repo, name)
        for line in engine.api.push(repo, tag=name, stream=True, decode=True):
            assert "error" not in line, line
    return refs


@pytest.fixture(scope="session")
def standin(engine, ns) -> str:
    ref = f"{ns}/kairos-init-standin:v0"
    build_push(engine, {"kairos-init": (STANDIN_SCRIPT.encode(), 0o755)},
               "FROM scratch\nCOPY kairos-init /kairos-init\n", [ref])
    return ref


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, ns, bases, standin) -> Workspace:
    """Three flavors: a (kairos-init stand-in, core + standard with k3s and with k0s), b (stand-in,
    core), c (mmdebstrap base + builtin converter: kernel, initrd, squashfs)."""
    root = tmp_path_factory.mktemp("ws")
    ws = Workspace(root=root, ns=ns)
    for name in ("a", "b"):
        (root / "flavors" / f"overlay-{name}" / "etc").mkdir(parents=True)
        (root / "flavors" / f"overlay-{name}" / "etc" / f"overlay-{name}.conf").write_text(f"flavor {name}\n")
    registry = f"{ns}/kairos"
    write_flavor(ws.flavors / "a.yaml", standin_doc(
        "standina", bases["a"], standin, registry, ["squashfs"], variants=["core", "standard"],
        k3s_versions=["v1.28.2+k3s1"], k0s_versions=["v1.34.4+k0s.0"], overlay="overlay-a", squashfs=LZ4))
    write_flavor(ws.flavors / "b.yaml", standin_doc(
        "standinb", bases["b"], standin, registry, ["squashfs"], overlay="overlay-b", squashfs=LZ4))
    write_flavor(ws.flavors / "c.yaml", builtin_doc(
        "debian", {"mmdebstrap": {"suite": "bookworm"}}, registry, ["kernel", "initrd", "squashfs"], squashfs=LZ4))
    return ws


@pytest.fixture(scope="session")
def first_run(workspace) -> Result:
    result = workspace.doit()
    assert result.rc == 0, result.err
    return result

