"""bench/run.py on a 4-build synthetic matrix (rows noop and selective), run as a subprocess
the way a person runs it. Asserts what the rows report, never how long anything took.

The bench pushes under <session namespace>/bench (a tiny base cut from the session's minbase
tarball, the converted images) and uses the session's kairos-init stand-in; `--clean` removes
the bench's images afterwards, and the session namespace is dropped at the end anyway.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.integration

BENCH = REPO / "bench" / "run.py"
PROBE = "kairos-benchprobe-1-core-amd64-generic-v3.1.0"
# 4 builds: the one-build probe flavor + one flavor with core and two standard builds.
# Tasks with actions: preflight, resolve and pull of the base and of the stand-in,
# convert/push/squashfs per build, the manifest.
TASKS = 1 + 2 + 2 + 3 * 4 + 1


def bench(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    print(f"$ bench/run.py {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def images_under(engine, namespace: str) -> list[str]:
    found = []
    for image in engine.images.list():
        names = (image.attrs.get("RepoTags") or []) + (image.attrs.get("RepoDigests") or [])
        found += [n for n in names if n.startswith(namespace + "/")]
    return found


def row_line(table: str, benchmark: str) -> str:
    lines = [line for line in table.splitlines() if line.startswith(benchmark)]
    assert len(lines) == 1, table
    return lines[0]


def test_noop_and_selective_rows_report_what_ran(tmp_path, ns, standin, rootfs_tar, engine):
    registry = f"{ns}/bench"
    rows_file = tmp_path / "rows.json"
    where = ["--dir", str(tmp_path / "bench"), "--registry", registry]
    try:
        proc = bench("--builds", "4", "--only", "noop,selective", *where, "--kairos-init", standin,
                     "--rootfs-tar", str(rootfs_tar), "--json", str(rows_file))
        assert proc.returncode == 0, proc.stderr

        rows = {r["name"]: r for r in json.loads(rows_file.read_text())}
        assert list(rows) == ["noop", "selective"]

        noop = rows["noop"]["data"]
        assert noop["builds"] == 4
        assert noop["tasks"] == TASKS
        assert noop["build_actions"] == []
        assert noop["executed"][0] == "preflight"
        assert sorted(t.split(":")[0] for t in noop["executed"]) == ["preflight", "resolve", "resolve"]
        assert "0 build actions" in row_line(proc.stdout, "no-op, 4 builds")

        selective = rows["selective"]
        assert sorted(selective["data"]["executed"]) == sorted(
            [f"convert:{PROBE}", f"push:{PROBE}", f"squashfs:{PROBE}", "manifest:v3.1.0"])
        assert selective["data"]["tasks"] == TASKS
        assert selective["met"] == "yes"
        line = row_line(proc.stdout, "selective rebuild")
        assert f"4 of {TASKS} tasks ran" in line
        assert f"convert/push/squashfs:{PROBE}, manifest:v3.1.0" in line

        # the overlay file was put back and the bench dir left up to date
        again = bench("--builds", "4", "--only", "noop", *where, "--kairos-init", standin,
                      "--rootfs-tar", str(rootfs_tar))
        assert again.returncode == 0, again.stderr
        assert "0 build actions" in row_line(again.stdout, "no-op, 4 builds")
    finally:
        cleaned = bench("--clean", *where)
    assert cleaned.returncode == 0, cleaned.stderr
    assert not (tmp_path / "bench").exists()
    assert images_under(engine, registry) == []


TORTURE = REPO / "bench" / "torture.py"


def test_torture_small_profile_finds_nothing_corrupt_or_stale_and_its_checks_catch_both(
        tmp_path, ns, standin, rootfs_tar, engine):
    """bench/torture.py --profile small: a few seeded trials, each killed in its stage and resumed;
    then the same checks on a squashfs with one byte flipped and on a marker the build does not
    hold, to show they would have reported corruption and staleness."""
    registry = f"{ns}/torture"
    where = ["--dir", str(tmp_path / "torture"), "--registry", registry]
    figures = tmp_path / "torture.json"
    try:
        proc = subprocess.run([sys.executable, str(TORTURE), "--profile", "small", "--trials", "6", "--seed", "3",
                               *where, "--kairos-init", standin, "--rootfs-tar", str(rootfs_tar),
                               "--json", str(figures)],
                              capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL)
        print(f"$ bench/torture.py --profile small --trials 6 -> {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        data = json.loads(figures.read_text())
        assert data["trials"] == 6
        assert sum(data["kills"].values()) >= 6 - data["missed"] > 0
        assert (data["corrupt"], data["stale"], data["leftovers"], data["noop_ran"], data["verify_failed"]) == \
            ([], [], [], [], [])
        assert "corrupt files       0" in proc.stdout and "stale files         0" in proc.stdout

        sys.path.insert(0, str(REPO / "bench"))
        from kbench import torture
        from kbench.space import Space
        space = Space.under(tmp_path / "torture" / "small")
        (b,) = space.builds()
        squashfs = space.paths.artifact(b, ".squashfs")
        markers = torture.current_markers(space)
        assert torture.stale_files(space, torture.PROFILES["small"], markers, torture.Hashes()) == []
        with open(squashfs, "r+b") as f:
            f.seek(4096)
            byte = f.read(1)
            f.seek(4096)
            f.write(bytes([byte[0] ^ 0xFF]))
        assert torture.corrupt_files(space, torture.Hashes()) == [squashfs.name]
        stale = torture.stale_files(space, torture.PROFILES["small"], {**markers, "overlay": "not-built"},
                                    torture.Hashes())
        assert f"{squashfs.name} (SHA256SUMS)" in stale
        assert any(s.startswith(f"{squashfs.name} (overlay marker") for s in stale)
    finally:
        cleaned = subprocess.run([sys.executable, str(TORTURE), "--clean", *where], capture_output=True, text=True,
                                 timeout=600, stdin=subprocess.DEVNULL)
    assert cleaned.returncode == 0, cleaned.stderr
    assert not (tmp_path / "torture").exists()
    assert images_under(engine, registry) == []
