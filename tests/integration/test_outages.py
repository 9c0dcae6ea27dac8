"""Outages mid-run: the registry a flavor pushes to, and the Docker daemon itself,
stopped while doit is running. The run fails with a clear message (no traceback),
records nothing it did not finish, leaves no file under a final name, and the next
run, once the service is back, completes.

The registry test uses a second registry process on 127.0.0.1:5011 (its own storage) so
the session's registry keeps serving, behind a throttling TCP proxy on a free port of
127.0.0.1 (tests/throttle.py, 8 MiB/s) that the flavor's `registry:` names. The proxy counts
the bytes the engine sends; once 16 MiB of the push (whose largest layer is 64 MiB of random
data) have gone through, the test kills the registry (SIGKILL), in the middle of an upload.
The registry's storage shows it: a partial upload under `_uploads/` that is a prefix of the
large layer, and no blob of that layer. The daemon test stops the machine's one dockerd (a
second dockerd would take over docker0) and starts it again through ci/setup.sh; it is
marked `stops_engine`: tests/conftest.py runs this module last, and the test alone (the
other xdist worker waits on the engine lock).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import docker.errors
import pytest

from tasks.config import load_flavors
from tasks.matrix import expand

from tests.harness import LZ4, MANIFEST_TYPES, REPO, Result, Workspace, engine_answers, standin_doc, write_flavor
from tests.throttle import ThrottleProxy

pytestmark = pytest.mark.integration
SPARE = "127.0.0.1:5011"
WAIT = 600
MIB = 1 << 20
RATE = 8 * MIB  # bytes/s the proxy lets through to the spare registry: 64 MiB take 8 s
THRESHOLD = 16 * MIB  # bytes through the proxy after which the test kills the registry


class SpareRegistry:
    """A docker-registry process on 127.0.0.1:5011 that a test can stop and start."""

    def __init__(self, root: Path):
        self.config = root / "registry.yml"
        self.log = root / "registry.log"
        self.storage = root / "storage"
        self.config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                               f"    rootdirectory: {self.storage}\nhttp:\n  addr: {SPARE}\n")
        self.proc: subprocess.Popen | None = None

    def up(self) -> bool:
        try:
            urllib.request.urlopen(f"http://{SPARE}/v2/", timeout=2).close()
            return True
        except OSError:
            return False

    def start(self) -> None:
        assert not self.up(), f"something already serves {SPARE}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        for _ in range(100):
            if self.up():
                return
            time.sleep(0.1)
        pytest.fail(f"the spare registry did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def uploads(self, repo: str) -> dict[str, bytes]:
        """What the registry holds of the uploads in progress to ``repo``: upload id -> data."""
        found = self.storage / "docker/registry/v2/repositories" / repo / "_uploads"
        return {p.parent.name: p.read_bytes() for p in found.glob("*/data")}

    def blob(self, digest: str) -> Path:
        algorithm, hexdigest = digest.split(":")
        return self.storage / "docker/registry/v2/blobs" / algorithm / hexdigest[:2] / hexdigest / "data"

    def blobs(self) -> set[str]:
        """Digests of the blobs the registry stores (complete uploads)."""
        return {f"sha256:{p.parent.name}" for p in (self.storage / "docker/registry/v2/blobs/sha256").glob("*/*/data")}

    def manifest(self, repo: str, reference: str) -> dict:
        request = urllib.request.Request(f"http://{SPARE}/v2/{repo}/manifests/{reference}",
                                         headers={"Accept": MANIFEST_TYPES})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


@pytest.fixture
def spare_registry(tmp_path):
    registry = SpareRegistry(tmp_path)
    registry.start()
    yield registry
    registry.kill()


@pytest.fixture
def throttled(spare_registry, engine):
    """A ThrottleProxy on a free port of 127.0.0.1 in front of the spare registry; the engine
    treats it as an insecure (plain HTTP) registry, as it does every address in 127.0.0.0/8."""
    host, port = SPARE.split(":")
    with ThrottleProxy((host, int(port)), rate=RATE, threshold=THRESHOLD) as proxy:
        yield proxy
    # the images tagged for the proxy's address are this test's: drop them with the storage
    for image in engine.images.list():
        if any(t.startswith(proxy.address + "/") for t in image.tags + (image.attrs.get("RepoDigests") or [])):
            try:
                engine.images.remove(image.id, force=True)
            except docker.errors.APIError:
                pass  # best effort, like the session's own clean-up


def run_until(ws: Workspace, args: list[str], when: str | threading.Event, then) -> Result:
    """Run doit, call ``then()`` as soon as ``when`` is set (an event) or doit's output has a
    line starting with ``when`` (a string), wait for doit to end (bounded) and return its result."""
    env = dict(os.environ, KAIROS_FLAVORS=str(ws.flavors), KAIROS_STATE=str(ws.state),
               KAIROS_OUTPUTS=str(ws.outputs), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    trigger = when if isinstance(when, threading.Event) else threading.Event()
    out: list[str] = []
    err: list[str] = []

    def read(stream, into: list[str], line: str | None) -> None:
        for text in stream:  # ends when doit ends
            into.append(text)
            if line is not None and text.startswith(line):
                trigger.set()

    readers = [threading.Thread(target=read, args=(proc.stdout, out, when if isinstance(when, str) else None)),
               threading.Thread(target=read, args=(proc.stderr, err, None))]
    for reader in readers:
        reader.start()
    fired = False
    deadline = time.monotonic() + WAIT
    try:
        while not fired and proc.poll() is None and time.monotonic() < deadline:
            fired = trigger.wait(0.5)  # returns as soon as it is set
        if fired:
            then()
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for reader in readers:
            reader.join(30)
    assert fired, f"{when!r} never happened while doit ran:\n{''.join(out)}\n{''.join(err)}"
    result = Result(proc.returncode, "".join(out), "".join(err))
    print(f"$ doit {' '.join(args)} -> {result.rc}\n{result.out[-3000:]}\n{result.err[-3000:]}")
    return result


def standin_flavor(ws: Workspace, name: str, base: str, standin: str, registry: str, overlay_mib: int = 0) -> None:
    """A kairos-init stand-in flavor; ``overlay_mib`` of random data make its build take a moment."""
    overlay = ws.flavors / f"overlay-{name}"
    overlay.mkdir(parents=True, exist_ok=True)
    (overlay / "id").write_text(uuid.uuid4().hex + "\n")  # a conversion no cache has seen
    if overlay_mib:
        (overlay / "payload.bin").write_bytes(os.urandom(overlay_mib << 20))
    write_flavor(ws.flavors / f"{name}.yaml", standin_doc(name, base, standin, registry, ["squashfs"],
                                                          overlay=f"overlay-{name}", squashfs=LZ4))


def leftovers(ws: Workspace) -> list[str]:
    """Files under a final name or a partial name in outputs (there should be none)."""
    return sorted(str(p.relative_to(ws.outputs)) for p in ws.outputs.rglob("*") if p.is_file()) \
        if ws.outputs.exists() else []


def test_registry_stopped_mid_push_is_a_clear_error_and_the_next_run_completes(
        tmp_path_factory, ns, bases, standin, spare_registry, throttled):
    ws = Workspace(root=tmp_path_factory.mktemp("registry-outage"), ns=ns)
    standin_flavor(ws, "outage", bases["b"], standin, f"{throttled.address}/kairos", overlay_mib=64)
    (b,) = expand(load_flavors([ws.flavors]))
    seen = {}

    def kill_registry() -> None:  # the proxy has sent THRESHOLD bytes of the push on
        spare_registry.kill()
        seen.update(forwarded=throttled.forwarded, uploads=spare_registry.uploads("kairos/outage"),
                    blobs=spare_registry.blobs())

    result = run_until(ws, [f"squashfs:{b.stem}"], throttled.tripped, kill_registry)
    assert result.rc != 0, result.out
    assert f".  push:{b.stem}" in result.out
    assert f"error: push:{b.stem}: " in result.err and throttled.address in result.err, result.err
    assert "Traceback" not in result.err
    assert not (ws.state / "pushed" / f"{b.stem}.digest").exists()  # nothing recorded as pushed
    assert f".  squashfs:{b.stem}" not in result.out and leftovers(ws) == []

    spare_registry.start()  # same storage: whatever the killed push left in it
    before = throttled.forwarded
    again = ws.doit(f"squashfs:{b.stem}")  # through the proxy again; its event is set already
    assert again.rc == 0, again.err
    assert f"push:{b.stem}" in again.executed and f"convert:{b.stem}" not in again.executed
    digest = (ws.state / "pushed" / f"{b.stem}.digest").read_text().strip()
    request = urllib.request.Request(f"http://{SPARE}/v2/kairos/outage/manifests/{digest}", method="HEAD",
                                     headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert (ws.outputs / "v3.1.0" / f"{b.stem}.squashfs").stat().st_size > 0

    # the kill was mid-upload: the registry held a partial upload that is a prefix of the
    # 64 MiB layer (as the second push stored it), and not that layer's blob
    layers = spare_registry.manifest("kairos/outage", digest)["layers"]
    large = max(layers, key=lambda layer: layer["size"])
    assert large["size"] > 64 * MIB, layers
    assert THRESHOLD <= seen["forwarded"] < sum(layer["size"] for layer in layers), seen["forwarded"]
    assert large["digest"] not in seen["blobs"]
    stored = spare_registry.blob(large["digest"]).read_bytes()
    prefixes = {upload: len(data) for upload, data in seen["uploads"].items() if data and stored.startswith(data)}
    assert prefixes and max(prefixes.values()) < large["size"], {u: len(d) for u, d in seen["uploads"].items()}
    assert throttled.forwarded - before >= large["size"]  # the second push went through the proxy too
    print(f"proxy: {seen['forwarded']} bytes forwarded at the kill (threshold {THRESHOLD}); large layer "
          f"{large['size']} bytes; partial uploads at the kill: "
          f"{ {u: len(d) for u, d in seen['uploads'].items()} }, of which prefixes of the large layer: {prefixes}; "
          f"second push: {throttled.forwarded - before} bytes through the proxy")


def dockerd_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def stop_dockerd() -> None:
    for pid in dockerd_pids():
        os.kill(pid, 15)  # SIGTERM: what `systemctl stop docker` sends


@pytest.mark.stops_engine
def test_docker_daemon_stopped_mid_conversion_is_a_clear_error_and_the_next_run_completes(
        tmp_path_factory, ns, bases, standin):
    assert not os.environ.get("DOCKER_HOST"), "this test stops the local dockerd"
    ws = Workspace(root=tmp_path_factory.mktemp("daemon-outage"), ns=ns)
    standin_flavor(ws, "daemonoutage", bases["b"], standin, f"{ns}/kairos", overlay_mib=64)
    (b,) = expand(load_flavors([ws.flavors]))
    assert ws.doit(f"pull:{b.base.ident}-amd64").rc == 0  # the base is in the engine

    try:
        result = run_until(ws, [f"squashfs:{b.stem}"], f".  convert:{b.stem}", stop_dockerd)
        for _ in range(120):  # bounded: dockerd takes a few seconds to shut down
            if not dockerd_pids():
                break
            time.sleep(0.5)
        assert result.rc != 0, result.out
        assert f"error: convert:{b.stem}: " in result.err, result.err
        assert "Traceback" not in result.err
        assert not (ws.state / "image" / f"{b.stem}.digest").exists()  # no image recorded
        assert leftovers(ws) == []

        # with the daemon still down the next run stops at once with the preflight message
        down = ws.doit(f"squashfs:{b.stem}")
        assert down.rc == 2 and "cannot reach the Docker daemon" in down.err, down.err
    finally:
        setup = subprocess.run(["bash", str(REPO / "ci" / "setup.sh")], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=WAIT)
        assert setup.returncode == 0 and engine_answers(), setup.stdout + setup.stderr

    again = ws.doit(f"squashfs:{b.stem}")
    assert again.rc == 0, again.err
    assert {f"convert:{b.stem}", f"push:{b.stem}", f"squashfs:{b.stem}"} <= set(again.executed)
    assert [p for p in leftovers(ws) if ".partial-" in p] == []
    assert (ws.outputs / "v3.1.0" / f"{b.stem}.squashfs").stat().st_size > 0


def test_a_tcp_docker_host_works_unchanged(tmp_path_factory, tmp_path, ns, bases, standin):
    """DOCKER_HOST=tcp://...: here a socat proxy on 127.0.0.1 in front of the machine's
    engine; every engine call of the run (BuildKit build, push, export) goes through it."""
    ws = Workspace(root=tmp_path_factory.mktemp("tcp-engine"), ns=ns)
    standin_flavor(ws, "tcpengine", bases["b"], standin, f"{ns}/kairos")
    (b,) = expand(load_flavors([ws.flavors]))
    port = 23750 + os.getpid() % 200
    log = tmp_path / "socat.log"
    with open(log, "wb") as fh:
        proxy = subprocess.Popen(["socat", "-d", "-d", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                                  "UNIX-CONNECT:/var/run/docker.sock"], stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(50):
            if "listening on" in log.read_text():
                break
            time.sleep(0.1)
        result = ws.doit(f"squashfs:{b.stem}", env={"DOCKER_HOST": f"tcp://127.0.0.1:{port}"})
    finally:
        proxy.terminate()
        proxy.wait()
    assert result.rc == 0, result.err
    assert {f"convert:{b.stem}", f"push:{b.stem}", f"squashfs:{b.stem}"} <= set(result.executed)
    assert log.read_text().count("accepting connection") >= 3  # preflight, build, push, export ...
    assert (ws.outputs / "v3.1.0" / f"{b.stem}.squashfs").stat().st_size > 0
