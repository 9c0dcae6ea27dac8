"""Outages mid-run: the registry a flavor pushes to, and the Docker daemon itself,
stopped while doit is running. The run fails with a clear message (no traceback),
records nothing it did not finish, leaves no file under a final name, and the next
run, once the service is back, completes.

The registry test uses a second registry process on 127.0.0.1:5001 (its own storage)
so the session's registry keeps serving. The daemon test stops the machine's one
dockerd (a second dockerd would take over docker0) and starts it again through
ci/setup.sh; it is marked `stops_engine`: tests/conftest.py runs this module last, and the test
alone (the other xdist worker waits on the engine lock).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import docker.errors
import pytest

from tasks.config import load_flavors
from tasks.matrix import expand

from tests.harness import LZ4, REPO, Result, Workspace, engine_answers, standin_doc, write_flavor

pytestmark = pytest.mark.integration
SPARE = "127.0.0.1:5001"
WAIT = 600


class SpareRegistry:
    """A docker-registry process on 127.0.0.1:5001 that a test can stop and start."""

    def __init__(self, root: Path):
        self.config = root / "registry.yml"
        self.log = root / "registry.log"
        self.config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                               f"    rootdirectory: {root / 'storage'}\nhttp:\n  addr: {SPARE}\n")
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


@pytest.fixture
def spare_registry(tmp_path, engine):
    registry = SpareRegistry(tmp_path)
    registry.start()
    yield registry
    registry.kill()
    # the images tagged for the spare registry are this test's: drop them with its storage
    for image in engine.images.list():
        if any(t.startswith(SPARE + "/") for t in image.tags + (image.attrs.get("RepoDigests") or [])):
            try:
                engine.images.remove(image.id, force=True)
            except docker.errors.APIError:
                pass  # best effort, like the session's own clean-up


def run_until(ws: Workspace, args: list[str], line: str, then) -> Result:
    """Run doit, call ``then()`` as soon as its output has a line starting with ``line``,
    wait for it to end (bounded) and return its result."""
    env = dict(os.environ, KAIROS_FLAVORS=str(ws.flavors), KAIROS_STATE=str(ws.state),
               KAIROS_OUTPUTS=str(ws.outputs), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    seen, fired = [], False
    try:
        for text in proc.stdout:  # ends when doit ends; the communicate() timeout bounds the rest
            seen.append(text)
            if not fired and text.startswith(line):
                then()
                fired = True
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert fired, f"doit never printed {line!r}:\n{''.join(seen)}"
    result = Result(proc.returncode, "".join(seen), err)
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
        tmp_path_factory, ns, bases, standin, spare_registry):
    ws = Workspace(root=tmp_path_factory.mktemp("registry-outage"), ns=ns)
    standin_flavor(ws, "outage", bases["b"], standin, f"{SPARE}/kairos", overlay_mib=64)
    (b,) = expand(load_flavors([ws.flavors]))

    result = run_until(ws, [f"squashfs:{b.stem}"], f".  push:{b.stem}", spare_registry.kill)
    assert result.rc != 0, result.out
    assert f"error: push:{b.stem}: " in result.err and SPARE in result.err, result.err
    assert "Traceback" not in result.err
    assert not (ws.state / "pushed" / f"{b.stem}.digest").exists()  # nothing recorded as pushed
    assert f".  squashfs:{b.stem}" not in result.out and leftovers(ws) == []

    spare_registry.start()  # same storage: whatever the killed push left in it
    again = ws.doit(f"squashfs:{b.stem}")
    assert again.rc == 0, again.err
    assert f"push:{b.stem}" in again.executed and f"convert:{b.stem}" not in again.executed
    digest = (ws.state / "pushed" / f"{b.stem}.digest").read_text().strip()
    request = urllib.request.Request(f"http://{SPARE}/v2/kairos/outage/manifests/{digest}", method="HEAD",
                                     headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert (ws.outputs / "v3.1.0" / f"{b.stem}.squashfs").stat().st_size > 0


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
