"""Session fixtures for the integration tests: the real Docker engine, the local
registry on 127.0.0.1:5000, a minimal Debian rootfs base image and a kairos-init
STAND-IN image (a shell script that records its flags; it is not kairos-init).

Expensive things are built once per session; the mmdebstrap rootfs tarball is
cached under /var/tmp/kairos-test-cache and reused across runs when present.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
REGISTRY = "127.0.0.1:5000"
CACHE = Path(os.environ.get("KAIROS_TEST_CACHE", "/var/tmp/kairos-test-cache"))
ALWAYS_RUN = ("preflight", "resolve:")

STANDIN_SCRIPT = r"""#!/bin/sh
# TEST STAND-IN for kairos-init: it is NOT kairos-init. It records the flags it
# was given (one line per call) and writes a minimal /etc/kairos-release.
set -e
echo "$*" >> /var/log/kairos-init-standin.log
stage=""; version=""
while [ $# -gt 0 ]; do
  case "$1" in
    -s|--stage) stage="$2"; shift 2 ;;
    -v|--version) version="$2"; shift 2 ;;
    *) shift ;;
  esac
done
if [ "$stage" = init ]; then
  printf 'KAIROS_VERSION="%s"\nKAIROS_CONVERTER="kairos-init-standin (test stand-in, not kairos-init)"\n' \
    "$version" > /etc/kairos-release
fi
"""


def pytest_collection_modifyitems(items):
    """Tests that stop the machine's dockerd run last, so an engine that comes back slowly
    (or not at all) cannot take the other tests down with it."""
    items.sort(key=lambda item: item.get_closest_marker("stops_engine") is not None)


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def executed(self) -> list[str]:
        return [l[3:].strip() for l in self.out.splitlines() if l.startswith(".  ")]

    @property
    def build_actions(self) -> set[str]:
        """Executed tasks other than the cheap always-run ones."""
        return {t for t in self.executed if not t.startswith(ALWAYS_RUN)}


@dataclass
class Workspace:
    root: Path
    ns: str
    env: dict = field(default_factory=dict)

    @property
    def flavors(self) -> Path:
        return self.root / "flavors"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    def doit(self, *args: str, env: dict | None = None, flavors: Path | None = None,
             state: Path | None = None, outputs: Path | None = None, timeout: int = 1800) -> Result:
        full = dict(os.environ)
        full.update({"KAIROS_FLAVORS": str(flavors or self.flavors), "KAIROS_STATE": str(state or self.state),
                     "KAIROS_OUTPUTS": str(outputs or self.outputs)})
        full.update(env or {})
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), *args],
                              capture_output=True, text=True, env=full, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        print(f"$ doit {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return result


def _build_push(client, files: dict[str, tuple[bytes, int]], dockerfile: str, tags: list[str]) -> str:
    """Build a tiny image with the legacy builder from in-memory files; push all tags."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, (data, mode) in {**files, "Dockerfile": (dockerfile.encode(), 0o644)}.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    image, _ = client.images.build(fileobj=buf, custom_context=True, tag=tags[0], rm=True)
    for t in tags:
        repo, _, name = t.rpartition(":")
        image.tag(repo, name)
        for line in client.api.push(repo, tag=name, stream=True, decode=True):
            assert "error" not in line, line
    return image.id


@pytest.fixture(scope="session")
def engine():
    try:
        client = docker.from_env(timeout=600)
        client.ping()
        urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=5).close()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Docker engine or local registry not available ({exc}); run: bash ci/setup.sh")
    return client


def _registry_json(method: str, url: str, accept: str = "") -> tuple[dict, dict]:
    request = urllib.request.Request(url, method=method, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
        return (json.loads(body) if body and method == "GET" else {}), dict(response.headers)


MANIFEST_TYPES = ", ".join(["application/vnd.docker.distribution.manifest.v2+json",
                            "application/vnd.docker.distribution.manifest.list.v2+json",
                            "application/vnd.oci.image.manifest.v1+json",
                            "application/vnd.oci.image.index.v1+json"])


def drop_namespace(client, namespace: str) -> None:
    """Remove what a test session left: its images in the engine and its manifests in the
    registry (blobs go at the registry's next garbage collection, which ci/setup.sh runs)."""
    path = namespace.split("/", 1)[1]
    for image in client.images.list():
        if any(t.startswith(namespace + "/") for t in image.tags):
            try:
                client.images.remove(image.id, force=True)
            except docker.errors.APIError:
                pass
    try:
        catalog, _ = _registry_json("GET", f"http://{REGISTRY}/v2/_catalog?n=1000&last={path}")
    except (OSError, ValueError):
        return  # best effort: cleaning up must never fail the run
    for repo in catalog.get("repositories") or []:
        if not repo.startswith(path + "/"):
            continue
        try:
            tags, _ = _registry_json("GET", f"http://{REGISTRY}/v2/{repo}/tags/list")
        except (OSError, ValueError):
            continue
        for tag in tags.get("tags") or []:
            try:
                _, headers = _registry_json("HEAD", f"http://{REGISTRY}/v2/{repo}/manifests/{tag}", MANIFEST_TYPES)
                digest = headers.get("Docker-Content-Digest")
                if digest:
                    _registry_json("DELETE", f"http://{REGISTRY}/v2/{repo}/manifests/{digest}")
            except (OSError, ValueError):
                continue


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
    if not tar.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
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
    _build_push(engine, {"kairos-init": (STANDIN_SCRIPT.encode(), 0o755)},
                "FROM scratch\nCOPY kairos-init /kairos-init\n", [ref])
    return ref


LZ4 = {"compression": "lz4"}  # squashfs options: fast, for test builds


def flavor_doc(flavor: str, release: str, base, registry: str, **more) -> dict:
    """A flavor file's mapping for one build (core, amd64, generic, v3.1.0); ``more`` adds
    keys or overrides these."""
    return {"flavor": flavor, "release": release, "base_image": base, "version": "v3.1.0",
            "variants": ["core"], "arches": ["amd64"], "devices": ["generic"], "registry": registry, **more}


def builtin_doc(flavor: str, base, registry: str, artifacts: list[str], release: str = "12", **more) -> dict:
    """A flavor (Debian 12 unless ``release``) on the builtin converter with a small initramfs
    (MODULES=list)."""
    return flavor_doc(flavor, release, base, registry, **{
        "converter": "builtin", "builtin": {"initramfs_modules": "list"}, "artifacts": artifacts, **more})


def standin_doc(flavor: str, base: str, standin: str, registry: str, artifacts: list[str], **more) -> dict:
    """A flavor converted by the kairos-init STAND-IN image."""
    return flavor_doc(flavor, "1", base, registry, **{
        "converter": "kairos-init", "kairos_init_image": standin, "artifacts": artifacts, **more})


def flavor_text(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def write_flavor(path: Path, flavor: str | dict) -> None:
    """Write a flavor file from YAML text or a mapping (flavor_doc and friends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(flavor_text(flavor) if isinstance(flavor, dict) else textwrap.dedent(flavor).lstrip())


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, ns, bases, standin) -> Workspace:
    """Three flavors: a (kairos-init stand-in, core + standard), b (stand-in, core),
    c (mmdebstrap base + builtin converter: kernel, initrd, squashfs)."""
    root = tmp_path_factory.mktemp("ws")
    ws = Workspace(root=root, ns=ns)
    for name in ("a", "b"):
        (root / "flavors" / f"overlay-{name}" / "etc").mkdir(parents=True)
        (root / "flavors" / f"overlay-{name}" / "etc" / f"overlay-{name}.conf").write_text(f"flavor {name}\n")
    registry = f"{ns}/kairos"
    write_flavor(ws.flavors / "a.yaml", standin_doc(
        "standina", bases["a"], standin, registry, ["squashfs"], variants=["core", "standard"],
        k3s_versions=["v1.28.2+k3s1"], overlay="overlay-a", squashfs=LZ4))
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


def copy_flavors(ws: Workspace, dest: Path, names: list[str]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(ws.flavors / name, dest / name)
    for overlay in ws.flavors.glob("overlay-*"):
        if not (dest / overlay.name).exists():
            shutil.copytree(overlay, dest / overlay.name)
    return dest
