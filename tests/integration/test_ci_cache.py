"""A CI run reproduced locally with ci/reproduce.sh, the way the shipped workflows run a
job: a fresh clone, the state and outputs restored from a cache directory, and a
Docker engine that holds none of the images involved (converted images, bases,
kairos-init stand-in), so it could only seed them from the registry. Nothing is
rebuilt or pulled; after one committed overlay change only that flavor's chain runs.

(A second, empty dockerd would be the purer fresh daemon, but dockerd with its own
--bridge deletes the host's docker0 and breaks the machine's engine; so --fresh-engine
removes the images from the one engine instead.)
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.harness import LZ4, REPO, standin_doc, write_flavor

pytestmark = pytest.mark.integration
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "init.defaultBranch=main"]


def source_repo(dest, flavors: dict[str, str | dict]) -> None:
    """A git repository holding this working tree (committed or not) plus test files
    (flavor mappings or text)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for rel, text in flavors.items():
        write_flavor(dest / rel, text)
    subprocess.run([*GIT, "init", "-q", str(dest)], check=True)
    commit(dest, "source")


def commit(repo, message: str) -> None:
    subprocess.run([*GIT, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(repo), "commit", "-q", "-m", message], check=True)


def reproduce(*args: str) -> tuple[int, str, set[str]]:
    proc = subprocess.run(["bash", str(REPO / "ci" / "reproduce.sh"), *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=1800, env=dict(os.environ))
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    actions = {line.split(None, 1)[1] for line in proc.stdout.splitlines() if line.startswith("reproduce:   ")}
    return proc.returncode, proc.stdout + proc.stderr, actions


def local_images(client, refs: list[str]) -> list[str]:
    found = []
    for ref in refs:
        try:
            client.images.get(ref)
            found.append(ref)
        except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound
            pass
    return found


def test_reproduced_ci_job_rebuilds_nothing_from_a_restored_cache_then_only_what_changed(
        tmp_path_factory, ns, bases, standin, engine):
    root = tmp_path_factory.mktemp("ci")
    src, cache, work = root / "src", root / "cache", root / "work"
    flavors = {}
    for name in ("a", "b"):
        flavors[f"ci-flavors/overlay-{name}/{name}.conf"] = f"{name}\n"
        flavors[f"ci-flavors/{name}.yaml"] = standin_doc(f"ci{name}", bases["b"], standin, f"{ns}/kairos",
                                                         ["squashfs"], overlay=f"overlay-{name}", squashfs=LZ4)
    source_repo(src, flavors)
    common = ["--cache", str(cache), "--work", str(work), "--flavors", "ci-flavors", str(src)]
    stems = {n: f"kairos-ci{n}-1-core-amd64-generic-v3.1.0" for n in ("a", "b")}

    # the CI job that filled the cache
    rc, out, actions = reproduce(*common)
    assert rc == 0, out
    assert {f"convert:{s}" for s in stems.values()} <= actions, actions
    assert (cache / "state" / "doit.db").is_file() and (cache / "outputs" / "v3.1.0").is_dir()

    # the next job: fresh clone, cache restored, an engine without any of the images
    listed = subprocess.run(["python3", "-m", "tasks", "images", "--flavors", "ci-flavors"], cwd=src,
                            env=dict(os.environ, KAIROS_STATE=str(cache / "state")),
                            capture_output=True, text=True, check=True).stdout.split()
    assert f"{ns}/kairos/cia:1-core-amd64-generic-v3.1.0" in listed and bases["b"] in listed and standin in listed
    rc, out, actions = reproduce("--fresh-engine", *common)
    assert rc == 0, out
    assert "fresh engine: removed" in out and "removed 0 " not in out, out
    assert "reproduce: build actions: 0" in out and actions == set(), actions
    assert local_images(engine, listed) == []  # nothing was pulled or built

    # one committed overlay change: that build's chain only
    (src / "ci-flavors" / "overlay-a" / "a.conf").write_text("a changed\n")
    commit(src, "change overlay a")
    rc, out, actions = reproduce("--fresh-engine", *common)
    assert rc == 0, out
    assert actions == {f"convert:{stems['a']}", f"push:{stems['a']}", f"squashfs:{stems['a']}",
                       "manifest:v3.1.0"}, actions
    assert local_images(engine, [f"{ns}/kairos/cia:1-core-amd64-generic-v3.1.0"])  # rebuilt, seeded from the registry


def test_reproduce_script_explains_itself_and_refuses_bad_use(tmp_path):
    helped = subprocess.run(["bash", str(REPO / "ci" / "reproduce.sh"), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--fresh-engine" in helped.stdout and "--cache DIR" in helped.stdout
    missing = subprocess.run(["bash", str(REPO / "ci" / "reproduce.sh")], capture_output=True, text=True)
    assert missing.returncode == 2 and "--cache DIR is required" in missing.stderr
    bad = subprocess.run(["bash", str(REPO / "ci" / "reproduce.sh"), "--cache", str(tmp_path), "--nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --nope" in bad.stderr
