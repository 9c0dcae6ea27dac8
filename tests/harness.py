"""The integration tests' harness, importable without pytest (bench/run.py uses it too):
flavor file builders, the kairos-init STAND-IN script, `doit` runs in a workspace and the
registry clean-up of a test namespace.

The pytest fixtures built on this (engine, registry namespace, base images, the session
workspace) are in tests/integration/conftest.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import docker.errors
import yaml

REPO = Path(__file__).resolve().parents[1]
REGISTRY = "127.0.0.1:5000"
CACHE = Path(os.environ.get("KAIROS_TEST_CACHE", "/var/tmp/kairos-test-cache"))
ALWAYS_RUN = ("preflight", "resolve:")

STANDIN_SCRIPT = r"""#!/bin/sh
# TEST STAND-IN for kairos-init: it is NOT kairos-init. It records the flags it
# was given and the test overlay files present then (one line per call) and writes
# a minimal /etc/kairos-release.
set -e
overlay=$(ls /etc/overlay-*.conf 2>/dev/null || true)
echo "$* | overlay: ${overlay:-none}" >> /var/log/kairos-init-standin.log
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


def buildkit_steps(output: str) -> dict[str, bool]:
    """Dockerfile steps in BuildKit's plain progress (`#N [i/n] STEP`) -> whether they were
    taken from the cache (a later line `#N CACHED`)."""
    steps: dict[str, str] = {}
    cached: set[str] = set()
    for line in output.splitlines():
        line = line.strip()
        m = re.match(r"#(\d+) \[[^\]]*?\d+/\d+\] (.+)$", line)
        if m:
            steps[m[1]] = m[2]
        elif re.fullmatch(r"#\d+ CACHED", line):
            cached.add(line.split()[0][1:])
    return {step: n in cached for n, step in steps.items()}


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


def build_push(client, files: dict[str, tuple[bytes, int]], dockerfile: str, tags: list[str]) -> str:
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


def _registry_json(method: str, url: str, accept: str = "") -> tuple[dict, dict]:
    request = urllib.request.Request(url, method=method, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
        return (json.loads(body) if body and method == "GET" else {}), dict(response.headers)


MANIFEST_TYPES = ", ".join(["application/vnd.docker.distribution.manifest.v2+json",
                            "application/vnd.docker.distribution.manifest.list.v2+json",
                            "application/vnd.oci.image.manifest.v1+json",
                            "application/vnd.oci.image.index.v1+json"])


def step_layers(image: str) -> dict[str, str]:
    """Dockerfile steps of a pushed image (as `buildkit_steps` names them) -> the diff id of the
    layer each made, read from the image's config in the registry."""
    repo, _, tag = image.split("/", 1)[1].rpartition(":")
    manifest, _ = _registry_json("GET", f"http://{REGISTRY}/v2/{repo}/manifests/{tag}", MANIFEST_TYPES)
    config, _ = _registry_json("GET", f"http://{REGISTRY}/v2/{repo}/blobs/{manifest['config']['digest']}")
    layers = iter(config["rootfs"]["diff_ids"])
    steps = {}
    for entry in config["history"]:
        if entry.get("empty_layer"):
            continue
        step = re.sub(r" # buildkit$", "", entry.get("created_by", "")).replace("RUN /bin/sh -c ", "RUN ", 1)
        steps[step] = next(layers)
    return steps


def drop_namespace(client, namespace: str) -> None:
    """Remove what a test session left: its images in the engine and its manifests in the
    registry (blobs go at the registry's next garbage collection, which ci/setup.sh runs)."""
    path = namespace.split("/", 1)[1]
    for image in client.images.list():
        # tagged, or left untagged by a later build under the same tag (known by its repo digest)
        if any(t.startswith(namespace + "/") for t in image.tags + (image.attrs.get("RepoDigests") or [])):
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


LZ4 = {"compression": "lz4"}  # squashfs options: fast, for test builds


def crane() -> str:
    """The crane binary (ci/setup.sh installs it)."""
    path = shutil.which("crane")
    assert path, "crane is not installed: run bash ci/setup.sh (go install ...go-containerregistry/cmd/crane)"
    return path


def crane_listing(ref: str) -> str:
    """`crane export --insecure <ref> - | tar -tvf -`: what a carrier image holds, as tar lists it."""
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{crane()} export --insecure {ref} - | tar -tvf -"],
                          capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def xz_content_sha256(path: Path) -> str:
    """sha256 of what the .xz file ``path`` holds, streamed from `xz -dc`."""
    digest = hashlib.sha256()
    with subprocess.Popen(["xz", "-dc", "--", str(path)], stdout=subprocess.PIPE,
                          stdin=subprocess.DEVNULL) as proc:
        for block in iter(lambda: proc.stdout.read(1 << 20), b""):
            digest.update(block)
    assert proc.returncode == 0, f"xz -dc {path} failed"
    return digest.hexdigest()


def flavor_doc(flavor: str, release: str, base, registry: str, **more) -> dict:
    """A flavor file's mapping for one build (core, amd64, generic, v3.1.0); ``more`` adds
    keys or overrides these."""
    return {"flavor": flavor, "release": release, "base_image": base, "version": "v3.1.0",
            "variants": ["core"], "arches": ["amd64"], "devices": ["generic"], "registry": registry, **more}


def builtin_doc(flavor: str, base, registry: str, artifacts: list[str], release: str = "12", **more) -> dict:
    """A flavor (Debian 12 unless ``release``) on the builtin converter."""
    return flavor_doc(flavor, release, base, registry, **{
        "converter": "builtin", "artifacts": artifacts, **more})


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


def copy_flavors(ws: Workspace, dest: Path, names: list[str]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(ws.flavors / name, dest / name)
    for overlay in ws.flavors.glob("overlay-*"):
        if not (dest / overlay.name).exists():
            shutil.copytree(overlay, dest / overlay.name)
    return dest


def engine_answers(sock: Path = Path("/var/run/docker.sock")) -> bool:
    """Whether the dockerd listening on ``sock`` answers its ping."""
    return subprocess.run(["curl", "-fsS", "--max-time", "3", "--unix-socket", str(sock), "http://localhost/_ping"],
                          capture_output=True).returncode == 0


@contextlib.contextmanager
def second_engine(start_timeout: float = 60):
    """DOCKER_HOST of a second, empty dockerd (a new CI runner's engine): its own data root, exec
    root and socket in a short directory under /var/tmp, its own bridge (made here: not `--bridge
    none`, with which dockerd deletes the machine's docker0 at start) and no iptables,
    so it leaves the machine's dockerd, docker0 and build cache alone; its RUN steps reach no
    network. Stopped and removed (with its bridge) afterwards."""
    root = Path(tempfile.mkdtemp(prefix="ke2-", dir="/var/tmp"))
    sock = root / "docker.sock"
    log = root / "dockerd.log"
    bridge = f"ke2{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    proc = None
    try:
        subprocess.run(["ip", "addr", "add", "192.168.213.1/24", "dev", bridge], check=True)
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen(["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "x"),
                                     "--pidfile", str(root / "docker.pid"), "-H", f"unix://{sock}", "--bridge", bridge,
                                     "--iptables=false", "--ip-masq=false", "--ip-forward=false",
                                     "--log-level", "warn"],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while not engine_answers(sock):
            assert proc.poll() is None, f"the second dockerd exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the second dockerd did not answer: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield f"unix://{sock}"
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(root))]
        for mount in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
