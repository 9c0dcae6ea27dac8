"""The Docker engine and the registry: the checks that they answer, the images the bench flavors
use (a tiny base, the minbase base, the kairos-init STAND-IN of tests/harness.py), each pushed
once and reused, and --clean."""
from __future__ import annotations

import argparse
import io
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.harness import STANDIN_SCRIPT, drop_namespace

from .common import BenchError, log, sh


MIRROR = "http://deb.debian.org/debian"
TINY_ROOTFS = ("bin", "lib", "lib64", "etc", "tmp", "var", "var/log", "usr", "usr/bin", "usr/bin/dash",
               "usr/bin/sh", "usr/lib", "usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/libc.so.6",
               "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "usr/lib64", "usr/lib64/ld-linux-x86-64.so.2")


def registry_host(ns: str) -> str:
    return ns.split("/", 1)[0]


def check_services(ns: str) -> None:
    """The Docker engine and the registry of ``ns`` must answer; say how to start them."""
    try:
        import docker
        docker.from_env(timeout=30).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means the same here
        raise BenchError(f"the Docker engine does not answer ({exc}); run: bash ci/setup.sh") from None
    url = f"http://{registry_host(ns)}/v2/"
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except OSError as exc:
        raise BenchError(f"the registry at {url} does not answer ({exc}); run: bash ci/setup.sh") from None


def engine():
    import docker
    return docker.from_env(timeout=600)


def in_registry(ref: str) -> bool:
    from tasks.tools import docker as kdocker
    return kdocker.registry_has(ref)


def build_and_push(ref: str, files: dict[str, bytes], mode: dict[str, int], dockerfile: str) -> None:
    """Build a small image from in-memory files (legacy builder) and push it as ``ref``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {**files, "Dockerfile": dockerfile.encode()}.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode.get(name, 0o644)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    client = engine()
    client.images.build(fileobj=buf, custom_context=True, tag=ref, rm=True)
    repo, _, tag = ref.rpartition(":")
    for line in client.api.push(repo, tag=tag, stream=True, decode=True):
        if "error" in line:
            raise BenchError(f"push {ref}: {line['error']}")


def ensure_image(ref: str, make) -> str:
    """Push ``ref`` unless the registry has it already (a rebuilt base would get a new digest and
    make every build of the bench dir reconvert)."""
    if not in_registry(ref):
        log(f"building and pushing {ref}")
        make(ref)
    return ref


def ensure_rootfs_tar(path: Path) -> Path:
    """The Debian minbase rootfs tarball (the integration tests' cache), built if missing."""
    if not path.exists():
        log(f"{path} missing: mmdebstrap (a few minutes)")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        sh(["mmdebstrap", "--variant=minbase", "--arch=amd64", "--format=tar", "bookworm", partial, MIRROR])
        partial.rename(path)
    return path


def tiny_rootfs(source: Path) -> bytes:
    """A tar of dash + libc out of the minbase tarball: enough for /bin/sh, ~2 MiB."""
    out = io.BytesIO()
    found = set()
    with tarfile.open(source) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            name = member.name.removeprefix("./").rstrip("/")
            if name in TINY_ROOTFS:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
                found.add(name)
    missing = sorted(set(TINY_ROOTFS) - found)
    if missing:
        raise BenchError(f"{source}: no {', '.join(missing)} (not an amd64 usr-merged Debian rootfs?)")
    return out.getvalue()


def push_rootfs(ref: str, rootfs: bytes, files: dict[str, bytes] | None = None) -> None:
    """A base image of ``rootfs`` plus ``files`` (path in the image -> bytes)."""
    extra = {f"extra{i}": data for i, data in enumerate((files or {}).values())}
    copies = "".join(f"COPY extra{i} {path}\n" for i, path in enumerate(files or {}))
    build_and_push(ref, {"rootfs.tar": rootfs, **extra}, {},
                   f'FROM scratch\nADD rootfs.tar /\n{copies}CMD ["/bin/sh"]\n')


def push_standin(ref: str) -> None:
    """The kairos-init STAND-IN of the integration tests (records flags; not kairos-init)."""
    build_and_push(ref, {"kairos-init": STANDIN_SCRIPT.encode()}, {"kairos-init": 0o755},
                   "FROM scratch\nCOPY kairos-init /kairos-init\n")


@dataclass(frozen=True)
class Images:
    """Image references the bench flavors use; each is pushed on first use unless given."""

    args: argparse.Namespace

    def _tar(self) -> Path:
        return ensure_rootfs_tar(self.args.rootfs_tar)

    def tiny_base(self) -> str:
        return self.args.base or ensure_image(f"{self.args.registry}/base-tiny:bookworm-dash",
                                              lambda ref: push_rootfs(ref, tiny_rootfs(self._tar())))

    def real_base(self, bench_id: str) -> str:
        """The minbase rootfs with /etc/kairos-bench-id: one base per bench dir, so the first
        conversion in a new bench dir is cold even when BuildKit's cache holds one made elsewhere."""
        return self.args.real_base or ensure_image(
            f"{self.args.registry}/base-minbase:bookworm-{bench_id}",
            lambda ref: push_rootfs(ref, self._tar().read_bytes(), {"/etc/kairos-bench-id": f"{bench_id}\n".encode()}))

    def standin(self) -> str:
        return self.args.kairos_init or ensure_image(f"{self.args.registry}/kairos-init-standin:v0",
                                                     push_standin)


def clean(root: Path, ns: str) -> None:
    """Remove the bench dir, the namespace's images from the engine (tagged or only pushed) and
    its manifests from the registry."""
    client = engine()
    drop_namespace(client, ns)
    for image in client.images.list():
        names = (image.attrs.get("RepoTags") or []) + (image.attrs.get("RepoDigests") or [])
        if any(n.startswith(ns + "/") for n in names):
            try:
                client.images.remove(image.id, force=True)
            except Exception:  # noqa: BLE001 - already gone or in use: best effort
                pass
    shutil.rmtree(root, ignore_errors=True)
    log(f"removed {root} and the images of {ns}")
