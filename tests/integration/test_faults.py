"""Faults: doit SIGKILLed in the middle of squashfs, ISO and raw image (once the partial file shows
up), and of signing deterministically (stopped by KAIROS_FAULT_STOP right before the signature's
rename, then killed there); mid-xz is test_release's, which compresses its image anyway (here
`raw_compression: none` saves minutes); targets deleted or truncated by hand; an outputs filesystem that is full. A killed step
never leaves a file under its final name, and the next run completes it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.config import load_flavors
from tasks.matrix import expand
from tasks.stages import extract
from tasks.state import Paths
from tasks.tools import docker as docker_tools

from tests.harness import REPO, Workspace, builtin_doc, write_flavor
from .test_supply_chain import PASSWORD, cosign_keys

pytestmark = pytest.mark.integration
KILL_TIMEOUT = 600


@pytest.fixture(scope="module")
def fws(tmp_path_factory, ns, bases):
    ws = Workspace(root=tmp_path_factory.mktemp("faults"), ns=ns)
    cosign_keys(ws.flavors / "keys", PASSWORD)
    write_flavor(ws.flavors / "faults.yaml", builtin_doc(
        "debian", bases["b"], f"{ns}/kairos", ["kernel", "initrd", "squashfs", "iso", "raw", "sign"],
        raw_generic=True, raw_compression="none", squashfs={"compression": "gzip"}, sign={"key": "keys/cosign.key"}))
    (b,) = expand(load_flavors([ws.flavors]))
    result = ws.doit(f"push:{b.stem}")
    assert result.rc == 0, result.err
    return ws, b, {"COSIGN_PASSWORD": PASSWORD}


def out(ws: Workspace, name: str) -> Path:
    return ws.outputs / "v3.1.0" / name


def partials(ws: Workspace) -> list[str]:
    folder = ws.outputs / "v3.1.0"
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name) if folder.is_dir() else []


def kill_during(ws: Workspace, task: str, partial_prefix: str, env: dict | None = None) -> None:
    """Run `doit <task>` and SIGKILL its whole process group once a partial
    output named `.<partial_prefix>.partial-*` exists."""
    full = dict(os.environ, KAIROS_FLAVORS=str(ws.flavors), KAIROS_STATE=str(ws.state),
                KAIROS_OUTPUTS=str(ws.outputs), **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), task],
                            env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + KILL_TIMEOUT
    folder = ws.outputs / "v3.1.0"
    try:
        while time.monotonic() < deadline:
            if folder.is_dir() and any(p.name.startswith(f".{partial_prefix}.partial-") for p in folder.iterdir()):
                break
            assert proc.poll() is None, f"doit {task} ended before writing {partial_prefix}"
            time.sleep(0.02)
        else:
            pytest.fail(f"no partial {partial_prefix} within {KILL_TIMEOUT}s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat (R, S, T for stopped, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def kill_before_rename(ws: Workspace, task: str, name: str, env: dict | None = None) -> None:
    """Deterministic: run `doit <task>` with KAIROS_FAULT_STOP=<name>, so the writer of `name` stops
    itself (SIGSTOP) with the file complete under its partial name, right before its rename; then
    SIGKILL the whole process group at exactly that point."""
    full = dict(os.environ, KAIROS_FLAVORS=str(ws.flavors), KAIROS_STATE=str(ws.state),
                KAIROS_OUTPUTS=str(ws.outputs), KAIROS_FAULT_STOP=name, **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), task],
                            env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + KILL_TIMEOUT
    try:
        while process_state(proc.pid) != "T":
            assert proc.poll() is None, f"doit {task} ended without stopping before renaming {name}"
            assert time.monotonic() < deadline, f"doit {task} did not stop before renaming {name} within {KILL_TIMEOUT}s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def extract_containers(engine, ws: Workspace, b) -> list:
    owner = extract.container_owner(Paths(ws.state, ws.outputs), b, "squashfs")
    return engine.containers.list(all=True, filters={"label": f"{docker_tools.EXTRACT_LABEL}={owner}"})


def test_sigkill_mid_squashfs_leaves_no_final_file_and_next_run_completes(fws, engine):
    ws, b, _ = fws
    name = f"{b.stem}.squashfs"
    kill_during(ws, f"squashfs:{b.stem}", name)
    assert not out(ws, name).exists() and not out(ws, name + ".sha256").exists()
    assert any(p.startswith(f".{name}.partial-") for p in partials(ws))
    assert len(extract_containers(engine, ws, b)) == 1  # the killed run could not remove it
    result = ws.doit(f"squashfs:{b.stem}")
    assert result.rc == 0, result.err
    assert f"squashfs:{b.stem}" in result.executed
    assert partials(ws) == []
    assert extract_containers(engine, ws, b) == []  # the next run removed the leftover
    check = subprocess.run(["unsquashfs", "-s", str(out(ws, name))], capture_output=True, text=True)
    assert check.returncode == 0 and "Filesystem size" in check.stdout


def test_sigkill_mid_iso(fws):
    ws, b, _ = fws
    name = f"{b.stem}.iso"
    assert ws.doit(f"initrd:{b.stem}", f"kernel:{b.stem}").rc == 0
    kill_during(ws, f"iso:{b.stem}", name)
    assert not out(ws, name).exists()
    result = ws.doit(f"iso:{b.stem}")
    assert result.rc == 0, result.err
    assert partials(ws) == []
    digest, fname = out(ws, name + ".sha256").read_text().split()
    assert fname == name and subprocess.run(["sha256sum", "-c", name + ".sha256"], cwd=out(ws, ""),
                                            capture_output=True).returncode == 0


def test_sigkill_mid_raw_image(fws):
    ws, b, _ = fws
    name = f"{b.stem}.img"
    assert ws.doit(f"squashfs:{b.stem}", f"initrd:{b.stem}", f"kernel:{b.stem}").rc == 0
    kill_during(ws, f"raw:{b.stem}", name)
    assert not out(ws, name).exists() and not out(ws, name + ".sha256").exists()
    result = ws.doit(f"raw:{b.stem}")
    assert result.rc == 0, result.err
    assert f"raw:{b.stem}" in result.executed
    assert partials(ws) == []
    table = subprocess.run(["sfdisk", "-J", str(out(ws, name))], capture_output=True, text=True)
    assert table.returncode == 0 and json.loads(table.stdout)["partitiontable"]["label"] == "dos", table.stderr
    assert subprocess.run(["sha256sum", "-c", name + ".sha256"], cwd=out(ws, ""),
                          capture_output=True).returncode == 0


def test_sigkill_mid_signing(fws):
    ws, b, env = fws
    assert ws.doit(f"build:{b.stem}", env=env).rc == 0  # everything but a fresh signature
    assert ws.doit("forget", f"sign:{b.stem}").rc == 0
    sig = f"{b.stem}.squashfs.sha256.sig"
    before = out(ws, sig).read_bytes()  # the signature of the build: run
    kill_before_rename(ws, f"sign:{b.stem}", sig, env=env)
    # killed with the new signature complete under its partial name: the old one is still in place
    (partial,) = [p for p in partials(ws) if p.startswith(f".{sig}.partial-")]
    new = out(ws, partial).read_bytes()
    assert out(ws, sig).read_bytes() == before and new and new != before  # cosign's signatures are randomized
    result = ws.doit(env=env)
    assert result.rc == 0, result.err
    assert f"sign:{b.stem}" in result.executed  # not recorded as done: it runs again
    assert partials(ws) == []
    verified = ws.doit("verify", env=env)
    assert verified.rc == 0, verified.err


def test_deleted_target_is_rebuilt_alone(fws):
    ws, b, env = fws
    assert ws.doit(env=env).build_actions == set()
    out(ws, f"{b.stem}-kernel").unlink()
    result = ws.doit(env=env)
    assert result.rc == 0, result.err
    # same bytes again: the kernel's .sha256 is unchanged in content, so nothing downstream reruns
    assert result.build_actions == {f"kernel:{b.stem}"}
    assert out(ws, f"{b.stem}-kernel").stat().st_size > 0


def test_truncated_target_is_flagged_by_verify(fws):
    ws, b, env = fws
    kernel = out(ws, f"{b.stem}-kernel")
    data = kernel.read_bytes()
    with open(kernel, "r+b") as fh:
        fh.truncate(len(data) // 2)
    try:
        result = ws.doit("verify", env=env)
        assert result.rc == 1
        assert f"{b.stem}-kernel: does not match {b.stem}-kernel.sha256" in result.err
    finally:
        kernel.write_bytes(data)


def test_full_outputs_filesystem_is_a_clean_error(fws, tmp_path):
    ws, b, _ = fws
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    assert mounted.returncode == 0, mounted.stderr
    try:
        result = ws.doit(f"kernel:{b.stem}", outputs=small)
        assert result.rc == 2, (result.out, result.err)
        assert "No space left on device" in result.err and str(small) in result.err, result.err
        assert "Traceback" not in result.err
        leftovers = [p.name for p in (small / "v3.1.0").iterdir()] if (small / "v3.1.0").exists() else []
        assert leftovers == [], leftovers
    finally:
        subprocess.run(["umount", str(small)], check=True)
