"""Thin client for the Docker engine and registries.

The Python Docker SDK serves ping, resolve (registry digest), pull, inspect,
push and export. Builds need BuildKit (`RUN --mount`), which the SDK lacks, so
they go through a docker CLI that has it: `docker buildx build --load`, or the
classic CLI (< 23, e.g. Debian's docker.io) with DOCKER_BUILDKIT=1.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..run import KairosError, UsageError, say

try:  # imported lazily so `plan` and unit tests work without the SDK installed
    import docker
    import docker.errors
except ImportError:  # pragma: no cover - pyproject depends on it
    docker = None


def daemon_address() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


@functools.lru_cache(maxsize=1)
def client():
    """A pinged Docker SDK client, or a UsageError saying how to get a daemon."""
    if docker is None:
        raise UsageError("cannot import the Python package docker; run: pip install docker")
    try:
        # ssh:// engines go through the ssh binary (like the docker CLI), not paramiko
        c = docker.from_env(timeout=600, use_ssh_client=daemon_address().startswith("ssh://"))
        c.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing here
        raise UsageError(
            f"cannot reach the Docker daemon at {daemon_address()}: {_short(exc)}; start it "
            "(bash ci/setup.sh starts dockerd) or point DOCKER_HOST at a running engine") from None
    return c


def _short(exc: BaseException) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    return " ".join(str(text).split())[:300]


def registry_host(ref: str) -> str:
    """The registry host of a reference (docker.io for bare names)."""
    first = ref.split("/", 1)[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def is_local_host(host: str) -> bool:
    """True for loopback registries (plain http): localhost, 127.0.0.0/8, [::1]."""
    if host.startswith("["):
        name = host[: host.find("]") + 1]
    else:
        name = host.rsplit(":", 1)[0]
    return name in ("localhost", "[::1]") or name.startswith("127.")


def check_registry(host: str) -> None:
    """Raise UsageError unless the registry at ``host`` answers its /v2/ endpoint."""
    if host == "docker.io":
        host = "registry-1.docker.io"
    scheme = "http" if is_local_host(host) else "https"
    url = f"{scheme}://{host}/v2/"
    try:
        urllib.request.urlopen(url, timeout=10).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:  # answers, wants a login: reachable
            return
        raise UsageError(f"registry {host} answered {exc.code} at {url}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"cannot reach registry {host} ({url}): {reason}; start it "
                         "(bash ci/setup.sh starts one on 127.0.0.1:5000) or fix the registry setting") from None


def registry_digest(ref: str) -> str:
    """The digest the registry holds for ``ref`` now (manifest list digest if multi-arch)."""
    try:
        return client().images.get_registry_data(ref).id
    except docker.errors.APIError as exc:
        raise KairosError(f"cannot resolve {ref} in registry {registry_host(ref)}: {_short(exc)}") from None


def registry_has(ref: str) -> bool:
    """True if the registry currently holds ``ref`` (used as an up-to-date check)."""
    try:
        client().images.get_registry_data(ref)
        return True
    except docker.errors.APIError:
        return False


def image_id(ref: str) -> str | None:
    """Local image ID of ``ref``, or None when the daemon does not have it."""
    try:
        return client().images.get(ref).id
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.APIError as exc:
        raise KairosError(f"cannot inspect image {ref}: {_short(exc)}") from None


def image_arch(ref: str) -> str | None:
    try:
        return client().images.get(ref).attrs.get("Architecture")
    except docker.errors.ImageNotFound:
        return None


def _follow(stream, label: str) -> dict:
    """Consume a pull/push JSON progress stream, print throttled progress, raise on error."""
    last = 0.0
    aux: dict = {}
    for event in stream:
        if "error" in event:
            raise KairosError(f"{label}: {event.get('error')}")
        if "aux" in event:
            aux.update(event["aux"])
        now = time.monotonic()
        if now - last > 10 and event.get("status"):
            say(f"    {label}: {event.get('status')} {event.get('progress', '')}".rstrip())
            last = now
    return aux


def pull(repo: str, digest: str, platform: str) -> str:
    """Pull ``repo@digest`` for ``platform``; return the local image ID."""
    ref = f"{repo}@{digest}"
    say(f"    pulling {ref} ({platform})")
    try:
        stream = client().api.pull(repo, tag=digest, platform=platform, stream=True, decode=True)
        _follow(stream, f"pull {ref}")
    except docker.errors.APIError as exc:
        raise KairosError(f"cannot pull {ref} ({platform}): {_short(exc)}") from None
    found = image_id(ref)
    if not found:
        raise KairosError(f"pulled {ref} but the daemon does not list it")
    return found


def push(tag: str) -> str:
    """Push ``tag`` and return the registry's manifest digest."""
    repo, _, name = tag.rpartition(":")
    say(f"    pushing {tag}")
    try:
        aux = _follow(client().api.push(repo, tag=name, stream=True, decode=True), f"push {tag}")
    except docker.errors.APIError as exc:
        raise KairosError(f"cannot push {tag}: {_short(exc)}") from None
    digest = aux.get("Digest")
    if not digest:
        raise KairosError(f"push of {tag} reported no digest")
    return digest


EXTRACT_LABEL = "io.kairos-doit.extract"


def extract_container(image: str, owner: str):
    """A created, never started container of ``image`` to copy files out of, labelled with
    ``owner`` (unique per state directory, build and purpose). Containers an earlier run
    left under the same owner (it was killed before it could remove them) go first."""
    c = client()
    for stale in c.containers.list(all=True, filters={"label": f"{EXTRACT_LABEL}={owner}"}):
        stale.remove(force=True)
    return c.containers.create(image, command=["/kairos-extract"], labels={EXTRACT_LABEL: owner})


def tag(image: str, ref: str) -> None:
    repo, _, name = ref.rpartition(":")
    if not client().images.get(image).tag(repo, name):
        raise KairosError(f"cannot tag {image} as {ref}")


@dataclass(frozen=True)
class BuildCli:
    """A docker CLI able to run BuildKit builds."""

    path: str
    mode: str  # "buildx" or "classic"

    def env(self) -> dict[str, str]:
        return {"DOCKER_BUILDKIT": "1"} if self.mode == "classic" else {}


def build_argv(cli: BuildCli, context: Path, image_tag: str, platform: str, iidfile: Path,
               labels: dict[str, str] | None = None, cache_from: tuple[str, ...] = (),
               no_cache: bool = False) -> list[str]:
    """The argv of a BuildKit build of ``context`` (pure; table-tested). With ``cache_from`` the
    image carries BuildKit's inline cache (so a push shares its layers as build cache) and the
    build reuses the inline cache of those images (a missing one is skipped by BuildKit).
    ``no_cache``: every step runs again (`--no-cache`), reading no cache of any image; the
    image still carries its inline cache when ``cache_from`` is given, as it would otherwise."""
    if cli.mode == "buildx":
        argv = [cli.path, "buildx", "build", "--load"]
    else:
        argv = [cli.path, "build"]
    argv += ["--platform", platform, "--progress", "plain", "--iidfile", str(iidfile), "--tag", image_tag]
    for key, value in sorted((labels or {}).items()):
        argv += ["--label", f"{key}={value}"]
    if cache_from:
        argv += ["--build-arg", "BUILDKIT_INLINE_CACHE=1"]
        for ref in () if no_cache else cache_from:
            argv += ["--cache-from", ref]
    if no_cache:
        argv.append("--no-cache")
    argv.append(str(context))
    return argv


def _client_major(path: str) -> int | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    # "Docker version 20.10.24+dfsg1, build 297e128"
    words = out.split()
    if len(words) >= 3 and words[1] == "version":
        try:
            return int(words[2].split(".")[0])
        except ValueError:
            return None
    return None


@functools.lru_cache(maxsize=1)
def find_build_cli() -> BuildCli:
    """Pick a docker CLI that can run BuildKit builds, or explain how to get one."""
    forced = os.environ.get("KAIROS_DOCKER_CLI")
    candidates = [forced] if forced else []
    for c in (shutil.which("docker"), "/usr/bin/docker"):
        if c and c not in candidates and os.path.exists(c):
            candidates.append(c)
    for path in candidates:
        try:
            ok = subprocess.run([path, "buildx", "version"], capture_output=True, timeout=20,
                                stdin=subprocess.DEVNULL).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            continue
        if ok:
            return BuildCli(path, "buildx")
        major = _client_major(path)
        if major is not None and major < 23:
            return BuildCli(path, "classic")
    raise UsageError(
        "cannot find a docker CLI with BuildKit (needed for RUN --mount in the conversion Dockerfile): "
        f"tried {', '.join(candidates) or 'docker on PATH'}; install Debian package docker.io "
        "(its /usr/bin/docker builds with DOCKER_BUILDKIT=1) or the buildx plugin, or set KAIROS_DOCKER_CLI")


def read_iidfile(path: Path) -> str:
    text = Path(path).read_text().strip()
    if not text.startswith("sha256:"):
        raise KairosError(f"docker build wrote no image ID to {path}")
    return text

