"""ci/gitlab-ci.yml run for real by gitlab-ci-local (tasks/needs.py pins it; its shell executor
with --shell-isolation runs each job in its own directory under .gitlab-ci-local/builds, keeps
caches under .gitlab-ci-local/cache and artifacts under .gitlab-ci-local/artifacts) on a fresh
clone holding one small flavor. The cold pipeline: all four shard jobs succeed, shard 1 converts,
pushes and extracts the squashfs (shards 2-4 have no build), and shard 1's outputs/ is collected
as its artifact. The next pipeline on the same clone: every job restores its shard's cache and
none runs a build action (`preflight` and `resolve:*` always run; a shard without builds has no
task at all).

Only KAIROS_FLAVORS is overridden (`--variable`): the small flavor directory of the clone. The
clone's origin is a URL that gitlab-ci-local reads for CI_PROJECT_PATH and friends and must never
contact: it names a port this test listens on, and no connection may arrive there.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import docker.errors
import pytest

from tasks.needs import NPM_TOOLS

from tests.harness import ALWAYS_RUN, LZ4, standin_doc
from tests.integration.test_ci_cache import GIT, source_repo

pytestmark = pytest.mark.integration
SHARDS = 4
FLAVORS = "glci-flavors"
STEM = "kairos-glci-1-core-amd64-generic-v3.1.0"
JOB_LINE = re.compile(r"^(kairos: \[(\d+)\])\s*(>|\$) ?(.*)$")


class Listener:
    """A TCP port on 127.0.0.1 that counts the connections made to it."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # socket.timeout included
                continue
            self.accepted += 1
            conn.close()

    def wait_for(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.accepted < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.accepted == count, (self.accepted, count)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


def gitlab_ci_local() -> str:
    path = shutil.which("gitlab-ci-local")
    assert path, "gitlab-ci-local is not installed: run bash ci/setup.sh --all"
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    assert version == NPM_TOOLS["gitlab-ci-local"].version, f"gitlab-ci-local {version}: run bash ci/setup.sh --all"
    return path


def pipeline(clone: Path, home: Path) -> tuple[str, dict[int, list[str]], float]:
    """Run ci/gitlab-ci.yml in ``clone``: gitlab-ci-local's output, each shard job's own lines, seconds."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAIROS_", "PYTEST_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    started = time.monotonic()
    # artifacts stay in .gitlab-ci-local/artifacts (by default gitlab-ci-local also copies them into the clone)
    proc = subprocess.run([gitlab_ci_local(), "--file", "ci/gitlab-ci.yml", "--force-shell-executor",
                           "--shell-isolation", "--no-artifacts-to-source", "--no-color", "--home", str(home),
                           "--variable", f"KAIROS_FLAVORS={FLAVORS}"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    out = proc.stdout + proc.stderr
    jobs: dict[int, list[str]] = {}
    for line in out.splitlines():
        m = JOB_LINE.match(line)
        if m:
            jobs.setdefault(int(m[2]), []).append(m[4])
    assert proc.returncode == 0, out[-12000:]
    assert "fallback git remote data" not in out, out[-3000:]  # it read the origin URL (CI_PROJECT_PATH ...)
    assert sorted(jobs) == list(range(1, SHARDS + 1)), out[-6000:]
    for shard, lines in jobs.items():
        assert f" PASS  kairos: [{shard}]" in out.splitlines(), out[-6000:]
        # the job's plan step lists what its doit builds: shard 1 the one build, the others none
        assert f"{1 if shard == 1 else 0} build(s)" in lines, lines
        print(f"kairos: [{shard}] {next(line for line in lines if line.startswith('setup: times:'))}")
    return out, jobs, seconds


def task_lines(lines: list[str]) -> list[str]:
    """doit's lines: `.  <task>` ran, `-- <task>` was up to date."""
    return [line for line in lines if line.startswith((".  ", "-- "))]


def build_actions(lines: list[str]) -> set[str]:
    return {line[3:].strip() for line in task_lines(lines)
            if line.startswith(".  ") and not line[3:].startswith(ALWAYS_RUN)}


def test_gitlab_pipeline_builds_cold_then_restores_its_caches_and_builds_nothing(tmp_path, ns, bases, standin,
                                                                                  engine):
    clone, home = tmp_path / "clone", tmp_path / "home"
    home.mkdir()
    source_repo(clone, {f"{FLAVORS}/overlay-glci/glci.conf": "glci\n",
                        f"{FLAVORS}/glci.yaml": standin_doc("glci", bases["b"], standin, f"{ns}/kairos", ["squashfs"],
                                                            overlay="overlay-glci", squashfs=LZ4)})
    origin = Listener()
    socket.create_connection(("127.0.0.1", origin.port), timeout=5).close()
    origin.wait_for(1)  # it counts what arrives
    # a clone's origin as `git clone` leaves it (origin/HEAD -> origin/main), made without any fetch
    for args in (["remote", "add", "origin", f"https://127.0.0.1:{origin.port}/kairos/kairos-doit.git"],
                 ["update-ref", "refs/remotes/origin/main", "HEAD"],
                 ["symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/main"]):
        subprocess.run([*GIT, "-C", str(clone), *args], check=True)
    image = f"{ns}/kairos/glci:1-core-amd64-generic-v3.1.0"
    try:
        # the cold pipeline: shard 1 builds, shards 2-4 have nothing to build
        out, jobs, cold = pipeline(clone, home)
        print(f"cold pipeline: {cold:.0f} s")
        assert build_actions(jobs[1]) >= {f"convert:{STEM}", f"push:{STEM}", f"squashfs:{STEM}"}, task_lines(jobs[1])
        for shard in range(2, SHARDS + 1):
            assert task_lines(jobs[shard]) == [], jobs[shard]  # no build: doit has no task to run
        # shard 1's outputs/ is its artifact, the squashfs as its .sha256 says
        (squashfs,) = (clone / ".gitlab-ci-local" / "artifacts").glob(f"*/outputs/**/{STEM}.squashfs")
        recorded = (squashfs.parent / f"{squashfs.name}.sha256").read_text().split()[0]
        assert hashlib.sha256(squashfs.read_bytes()).hexdigest() == recorded

        # the next pipeline on the same clone: caches restored, nothing built anywhere
        out, jobs, warm = pipeline(clone, home)
        print(f"second pipeline: {warm:.0f} s; its doit task lines:")
        for shard, lines in sorted(jobs.items()):
            print(f"  kairos: [{shard}]")
            for line in task_lines(lines) or ["(no task lines: this shard has no build)"]:
                print(f"    {line}")
        for shard, lines in jobs.items():
            assert f"kairos: [{shard}] imported cache 'kairos-shard{shard}-of-{SHARDS}'" in out, out[-6000:]
            assert build_actions(lines) == set(), task_lines(lines)
        assert task_lines(jobs[1]) and all(task_lines(jobs[shard]) == [] for shard in range(2, SHARDS + 1))
        assert any(line.startswith(f"-- squashfs:{STEM}") for line in jobs[1]), task_lines(jobs[1])
        assert origin.accepted == 1, f"gitlab-ci-local contacted the clone's origin {origin.accepted - 1} time(s)"
    finally:
        origin.close()
        try:
            engine.images.remove(image, force=True)  # the bases and the stand-in are the session's
        except docker.errors.APIError:
            pass
    shutil.rmtree(clone)  # the clone, gitlab-ci-local's builds, caches and artifacts (kept when the test fails)
